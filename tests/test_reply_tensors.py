"""The privacy boundary for tensors: an update must fit the received global adapter exactly."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.reply import GLOBAL_UPDATE_KEY, PrivacyViolation, allowed_layout, build_reply, privacy_guard

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
GLOBAL = {A: torch.zeros(4, 8), B: torch.zeros(6, 4)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def incoming(global_adapter=GLOBAL) -> Message:
    records = {"config": ConfigRecord({"device-id": 3})}
    if global_adapter is not None:
        records["global-adapter"] = ArrayRecord(dict(global_adapter))
    return Message(RecordDict(records), dst_node_id=1, message_type="train")


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_fitting_update_leaves_as_float32_arrays():
    msg = incoming()
    assert allowed_layout(msg) == {A: (4, 8), B: (6, 4)}
    reply = privacy_guard(msg, context(), lambda m, c: build_reply(m, {"x": 1.0}, {A: torch.ones(4, 8), B: torch.ones(6, 4)}))
    record = reply.content[GLOBAL_UPDATE_KEY]
    assert list(record.keys()) == [A, B] and record[A].shape == (4, 8)
    assert torch.equal(record.to_torch_state_dict()[B], torch.ones(6, 4))


@pytest.mark.parametrize(
    "update, match",
    [
        ({A: torch.ones(2, 8), B: torch.ones(6, 4)}, "shape"),  # not padded to the global rank
        ({B: torch.ones(6, 4), A: torch.ones(4, 8)}, "order"),
        ({A: torch.ones(4, 8)}, "missing"),
        ({A: torch.ones(4, 8), B: torch.ones(6, 4), "m.personal.lora_B.weight": torch.ones(6, 4)}, "extra"),
        ({A: torch.ones(4, 8, dtype=torch.float64), B: torch.ones(6, 4)}, None),  # converted to float32 by build_reply
    ],
)
def test_build_reply_refuses_updates_that_do_not_fit(update, match):
    if match is None:
        assert build_reply(incoming(), {}, update).content[GLOBAL_UPDATE_KEY][A].dtype == "float32"
        return
    with pytest.raises(PrivacyViolation, match=match):
        build_reply(incoming(), {}, update)


def test_guard_refuses_hand_built_updates_that_bypass_build_reply():
    def personal_tensors(msg, ctx):  # a personal B smuggled under the update's name
        return Message(RecordDict({"metrics": MetricRecord({}), GLOBAL_UPDATE_KEY: ArrayRecord(
            {A: torch.ones(4, 8), "m.q_proj.lora_B.personal": torch.ones(6, 4)})}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="not the global adapter"):
        privacy_guard(incoming(), context(), personal_tensors)

    def wrong_dtype(msg, ctx):
        return Message(RecordDict({GLOBAL_UPDATE_KEY: ArrayRecord(
            {A: torch.ones(4, 8, dtype=torch.float16), B: torch.ones(6, 4)})}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="float32"):
        privacy_guard(incoming(), context(), wrong_dtype)

    def any_update(msg, ctx):
        return Message(RecordDict({GLOBAL_UPDATE_KEY: ArrayRecord(dict(GLOBAL))}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="sent no global adapter"):
        privacy_guard(incoming(None), context(), any_update)
