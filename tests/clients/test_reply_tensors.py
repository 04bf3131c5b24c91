"""The privacy boundary for tensors: an update must fit the received global adapter exactly."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from wire.messages import GLOBAL_UPDATE_KEY, PrivacyViolation, allowed_layout, build_reply, downlink_records
from clients.guard import check_reply, privacy_guard
from fedasls.device.faults import FailureCode
from fedasls.federated.strategy import Downlink

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
GLOBAL = {A: torch.zeros(4, 8), B: torch.zeros(6, 4)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


CLIP = 100.0  # the updates below are not clipped: ||ones|| is about 7.5


def incoming(global_adapter=GLOBAL, clip_norm: float = CLIP, devices: list[int] | None = None) -> Message:
    """A train message as the server sends it (for device 3, or a worker slot's `devices`): the global
    adapter and the round's knobs (a Downlink)."""
    records = {"config": ConfigRecord({"device-ids": devices} if devices else {"device-id": 3})}
    if global_adapter is not None:
        records |= downlink_records(Downlink("global", False, 4, 0, clip_norm, dict(global_adapter)))
    return Message(RecordDict(records), dst_node_id=1, message_type="train")


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_fitting_update_leaves_as_float32_arrays():
    msg = incoming()
    assert allowed_layout(msg) == {A: (4, 8), B: (6, 4)}
    reply = privacy_guard(msg, context(), lambda m, c: build_reply(m, {"device_id": 3}, {A: torch.ones(4, 8), B: torch.ones(6, 4)}))
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


def refused(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == FailureCode.REFUSED and not reply.has_content()


def test_guard_refuses_hand_built_updates_that_bypass_build_reply():
    def personal_tensors(msg, ctx):  # a personal B smuggled under the update's name
        return Message(RecordDict({"metrics": MetricRecord({}), GLOBAL_UPDATE_KEY: ArrayRecord(
            {A: torch.ones(4, 8), "m.q_proj.lora_B.personal": torch.ones(6, 4)})}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="not the global adapter"):
        check_reply(personal_tensors(incoming(), context()), allowed_layout(incoming()), clip_norm=CLIP)
    assert refused(privacy_guard(incoming(), context(), personal_tensors))  # what leaves: the REFUSED code only

    def wrong_dtype(msg, ctx):
        return Message(RecordDict({GLOBAL_UPDATE_KEY: ArrayRecord(
            {A: torch.ones(4, 8, dtype=torch.float16), B: torch.ones(6, 4)})}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="float32"):
        check_reply(wrong_dtype(incoming(), context()), allowed_layout(incoming()), clip_norm=CLIP)
    assert refused(privacy_guard(incoming(), context(), wrong_dtype))  # what leaves: the REFUSED code only

    def any_update(msg, ctx):
        return Message(RecordDict({GLOBAL_UPDATE_KEY: ArrayRecord(dict(GLOBAL))}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="sent no global adapter"):
        check_reply(any_update(incoming(None), context()), allowed_layout(incoming(None)))
    assert refused(privacy_guard(incoming(None), context(), any_update))  # what leaves: the REFUSED code only


def test_a_batch_reply_carries_one_checked_update_per_device_that_trained():
    from wire.messages import batch_update_key, build_batch_reply, reply_updates

    rows = [{"device_id": 4, "examples": 3}, {"device_id": 9, "examples": 5}]
    update = {A: torch.full((4, 8), 2.0), B: torch.ones(6, 4)}
    reply = privacy_guard(incoming(devices=[4, 9]), context(), lambda m, c: build_batch_reply(m, rows, None, {9: update}))
    assert not reply.has_error() and set(reply.content.keys()) == {"metrics", batch_update_key(9)}
    got = reply_updates(reply)
    assert list(got) == [9] and list(got[9]) == [A, B] and torch.equal(got[9][A], update[A])
    with pytest.raises(PrivacyViolation, match="not among this batch"):
        build_batch_reply(incoming(), rows, None, {5: update})  # a device the slot did not run
    with pytest.raises(PrivacyViolation, match="shape"):
        build_batch_reply(incoming(), rows, None, {4: {A: torch.ones(2, 8), B: torch.ones(6, 4)}})
    with pytest.raises(PrivacyViolation, match="sent no global adapter"):
        build_batch_reply(incoming(None), rows, None, {4: update})


def test_guard_refuses_a_batch_reply_with_an_update_of_a_device_it_did_not_run():
    from wire.messages import batch_update_key

    def stranger(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"device_id": [4, 9]}),
                                   batch_update_key(5): ArrayRecord(dict(GLOBAL))}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="no results for"):
        check_reply(stranger(incoming(), context()), allowed_layout(incoming()), clip_norm=CLIP)
    assert refused(privacy_guard(incoming(), context(), stranger))

    def named_oddly(msg, ctx):  # only "global-update.<device id>" is a batch update's name
        return Message(RecordDict({"metrics": MetricRecord({"device_id": [4]}),
                                   "global-update.personal": ArrayRecord(dict(GLOBAL))}), reply_to=msg)

    assert refused(privacy_guard(incoming(), context(), named_oddly))
