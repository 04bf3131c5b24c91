"""The privacy boundary: only scalar metrics (or a global update) may leave a device."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from clients.reply import PrivacyViolation, build_reply, check_reply, privacy_guard

CANARY = "CANARY-7f3a-user-secret"


@pytest.fixture(autouse=True)
def task_identity():
    """Flower sets the run/node identity inside a running app; outside one, tests set it."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def incoming() -> Message:
    return Message(RecordDict({"config": ConfigRecord({"device-id": 3})}), dst_node_id=1, message_type="train")


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_build_reply_keeps_numbers_only():
    reply = build_reply(incoming(), {"rouge1": 0.25, "device_id": 3})
    assert set(reply.content.keys()) == {"metrics"}
    assert dict(reply.content["metrics"]) == {"rouge1": 0.25, "device_id": 3}
    check_reply(reply)


def test_build_reply_refuses_text():
    with pytest.raises(PrivacyViolation, match="only numbers"):
        build_reply(incoming(), {"answer": CANARY})


def test_guard_refuses_a_reply_smuggling_text_or_tensors():
    def leaky_app(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"a": 1.0}), "buffer": ConfigRecord({"q": CANARY})}),
                       reply_to=msg)

    with pytest.raises(PrivacyViolation, match="buffer"):
        privacy_guard(incoming(), context(), leaky_app)

    def config_as_metrics(msg, ctx):
        return Message(RecordDict({"metrics": ConfigRecord({"q": CANARY})}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="MetricRecord"):
        privacy_guard(incoming(), context(), config_as_metrics)


def test_guard_passes_clean_replies():
    def clean_app(msg, ctx):
        return build_reply(msg, {"x": 1.0})

    reply = privacy_guard(incoming(), context(), clean_app)
    assert CANARY not in str(reply.content)


def test_global_update_slot_accepts_only_arrays():
    def arrays(msg, ctx):
        return Message(RecordDict({"global-update": ArrayRecord()}), reply_to=msg)

    with_adapter = incoming()
    with_adapter.content["global-adapter"] = ArrayRecord()  # an (empty) global adapter was sent
    privacy_guard(with_adapter, context(), arrays)

    def text(msg, ctx):
        return Message(RecordDict({"global-update": ConfigRecord({"t": CANARY})}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="ArrayRecord"):
        privacy_guard(incoming(), context(), text)


def test_batch_reply_carries_one_number_per_device_and_splits_back():
    from clients.reply import build_batch_reply, device_metrics

    rows = [{"device_id": 4, "rouge1": 0.5}, {"device_id": 9, "rouge1": 0.25}]
    reply = build_batch_reply(incoming(), rows)
    check_reply(reply)
    assert set(reply.content.keys()) == {"metrics"}
    assert device_metrics(reply) == rows
    assert device_metrics(build_batch_reply(incoming(), [])) == []  # every device of the slot failed
    assert device_metrics(build_reply(incoming(), rows[0])) == [rows[0]]
    with pytest.raises(PrivacyViolation, match="only numbers"):
        build_batch_reply(incoming(), [{"device_id": 1, "answer": CANARY}])
