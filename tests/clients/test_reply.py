"""The privacy boundary: only scalar metrics (or a global update) may leave a device."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from wire.messages import PrivacyViolation, build_reply
from clients.guard import check_reply, privacy_guard
from fedasls.device.faults import DeviceFailure, FailureCode

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


def refused(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == FailureCode.REFUSED and CANARY not in repr(reply.error)


def test_guard_refuses_a_reply_smuggling_text_or_tensors():
    def leaky_app(msg, ctx):
        return Message(RecordDict({"metrics": MetricRecord({"rouge1": 1.0}), "buffer": ConfigRecord({"q": CANARY})}),
                       reply_to=msg)

    with pytest.raises(PrivacyViolation, match="buffer"):
        check_reply(leaky_app(incoming(), context()))
    assert refused(privacy_guard(incoming(), context(), leaky_app))

    def config_as_metrics(msg, ctx):
        return Message(RecordDict({"metrics": ConfigRecord({"q": CANARY})}), reply_to=msg)

    assert refused(privacy_guard(incoming(), context(), config_as_metrics))


def test_an_app_that_raises_sends_a_code_and_a_fixed_message_only():
    def raising_app(msg, ctx):
        raise ValueError(f"bad field 'note': '... {CANARY} ...'")

    reply = privacy_guard(incoming(), context(), raising_app)
    assert reply.has_error() and reply.error.code == FailureCode.ERROR
    assert reply.error.reason == FailureCode.ERROR.message and CANARY not in reply.error.reason
    check_reply(reply)  # a fixed error reply passes the guard

    def failing_device(msg, ctx):
        raise DeviceFailure(FailureCode.CORRUPT_STATE, 3)

    reply = privacy_guard(incoming(), context(), failing_device)
    assert reply.error.code == FailureCode.CORRUPT_STATE and reply.error.reason == FailureCode.CORRUPT_STATE.message


def test_error_replies_with_free_text_are_refused():
    def free_text_error(msg, ctx):
        return Message(Error(code=int(FailureCode.ERROR), reason=f"ValueError: {CANARY}"), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="free-text"):
        check_reply(free_text_error(incoming(), context()))
    assert refused(privacy_guard(incoming(), context(), free_text_error))

    def flower_code(msg, ctx):  # Flower's own code for a raised exception carries its text
        return Message(Error(code=2, reason=CANARY), reply_to=msg)

    assert refused(privacy_guard(incoming(), context(), flower_code))


def test_guard_passes_clean_replies():
    def clean_app(msg, ctx):
        return build_reply(msg, {"rouge1": 1.0})

    reply = privacy_guard(incoming(), context(), clean_app)
    assert CANARY not in str(reply.content)


def test_global_update_slot_accepts_only_arrays():
    def arrays(msg, ctx):
        return Message(RecordDict({"global-update": ArrayRecord()}), reply_to=msg)

    from fedasls.federated.strategy import Downlink
    from wire.messages import downlink_records

    with_adapter = incoming()  # an (empty) global adapter was sent, with its round's knobs
    for key, record in downlink_records(Downlink("global", False, 4, 0, 1.0, {})).items():
        with_adapter.content[key] = record
    assert not privacy_guard(with_adapter, context(), arrays).has_error()

    def text(msg, ctx):
        return Message(RecordDict({"global-update": ConfigRecord({"t": CANARY})}), reply_to=msg)

    with pytest.raises(PrivacyViolation, match="ArrayRecord"):
        check_reply(text(incoming(), context()))
    assert refused(privacy_guard(incoming(), context(), text))


def test_a_batch_reply_lists_failed_devices_by_code_only():
    from clients.device_pool import run_devices
    from wire.messages import build_batch_reply, device_failures, device_metrics

    def device_round(settings_json, device_id, now, store_dir, simulated, server_round):
        if device_id == 2:
            raise DeviceFailure(FailureCode.CORRUPT_STATE, device_id)
        if device_id == 3:
            raise ValueError(CANARY)  # raised outside `contained`: logged on the worker, sent as a code
        return {"device_id": device_id, "rouge1": 0.5, "status_code": 0}

    rows, failures = run_devices(device_round, "{}", [1, 2, 3, 4], 0.0, "store", True, 1, 5)
    reply = build_batch_reply(incoming(), rows, failures)
    check_reply(reply)
    assert [m["device_id"] for m in device_metrics(reply)] == [1, 4]
    assert device_failures(reply) == {2: FailureCode.CORRUPT_STATE, 3: FailureCode.ERROR}
    assert CANARY not in repr(reply.content)


def test_batch_reply_carries_one_number_per_device_and_splits_back():
    from wire.messages import build_batch_reply, device_metrics

    rows = [{"device_id": 4, "rouge1": 0.5}, {"device_id": 9, "rouge1": 0.25}]
    reply = build_batch_reply(incoming(), rows)
    check_reply(reply)
    assert set(reply.content.keys()) == {"metrics"}
    assert device_metrics(reply) == rows
    assert device_metrics(build_batch_reply(incoming(), [])) == []  # every device of the slot failed
    assert device_metrics(build_reply(incoming(), rows[0])) == [rows[0]]
    with pytest.raises(PrivacyViolation, match="only numbers"):
        build_batch_reply(incoming(), [{"device_id": 1, "answer": CANARY}])


def test_batch_reply_of_devices_reporting_different_metrics_fills_nan():
    """Devices on one slot may report different stage timings (one annotated, one did not)."""
    import math

    from wire.messages import build_batch_reply, device_metrics

    rows = [{"device_id": 4, "stage_annotate_s": 0.5}, {"device_id": 9}]
    first, second = device_metrics(build_batch_reply(incoming(), rows))
    assert first == {"device_id": 4, "stage_annotate_s": 0.5}
    assert second["device_id"] == 9 and math.isnan(second["stage_annotate_s"])
