"""The ClientApp called the way Flower calls it (mods included), outside a simulation."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app
from fedasls.config import Settings
from fedasls.device.store import DeviceStore


@pytest.fixture(autouse=True)
def task_identity():
    """Flower sets the run/node identity inside a running app; outside one, tests set it."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def call(message_type: str, config: dict, node_config: dict) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1, message_type=message_type)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return app(msg, context)


def test_train_then_evaluate_one_device_with_its_partition_id(tiny_model_dir, tmp_path):
    settings = Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": 5, "stream_length": 30, "heldout": 2},
        "synthesis": {"method": "fallback", "rewrites": 1},
        "adaptation": {"epochs": 1, "lora_rank": 4},
        "evaluation": {"max_new_tokens": 8},
        "heterogeneity": {"availability": "always"},
    })
    base = {"settings": settings.model_dump_json(), "store": str(tmp_path / "ignored")}
    node = {"partition-id": 3, "store-dir": str(tmp_path / "device")}  # Deployment Engine: no device-id sent
    reply = call("train", {**base, "now": 30 * 86400.0}, node)
    metrics = dict(reply.content["metrics"])
    assert metrics["device_id"] == 3 and metrics["status_code"] == 0 and metrics["new_interactions"] == 30
    assert DeviceStore(tmp_path / "device").exists(3)  # the node's own store, not the message's
    assert set(reply.content.keys()) == {"metrics"}
    assert metrics["stage_worker_setup_s"] > 0 and metrics["stage_train_cpu_s"] > 0  # stage timings, numbers only

    evaluated = dict(call("evaluate", base, node).content["metrics"])
    assert evaluated["device_id"] == 3
    for key in ("rouge1", "rougeL", "perplexity", "base_rouge1", "base_rougeL", "base_perplexity"):
        assert evaluated[key] == pytest.approx(metrics[key])  # the saved device, evaluated again


def test_a_model_that_fails_to_load_fails_inside_the_device_round(tmp_path):
    """The worker's first model load runs inside the device round: a failure there is contained
    like any other (error code in the reply, traceback in the device's own errors.log)."""
    from clients.app import _WORKER

    missing = tmp_path / "no-such-model"
    settings = Settings.model_validate({"model": {"path": str(missing)}, "population": {"num_devices": 2}})
    _WORKER.clear()  # this worker's first call for these settings
    config = {"settings": settings.model_dump_json(), "store": str(tmp_path / "store"), "now": 86400.0, "device-id": 1}
    reply = call("train", config, {})
    assert reply.has_error() and reply.error.code == 100
    log = (tmp_path / "store").rglob("errors.log")
    assert any(str(missing) in path.read_text() for path in log)
