"""The privacy boundary in a real Flower simulation: every strategy, DP on and off.

Unique canary strings are planted in every device's data (questions and preferred answers);
one Simulation Engine run (Ray) serves every mode in turn through the same ServerApp, whose grid
records the serialized bytes of every message the server receives. No canary may appear in
them, and each reply may hold only the metrics record and, in a global-adapter round, an update
with exactly the global adapter's tensor names and shapes.

An honest run proves little about the guard (an honest device sends no canary, guard or not), so
`test_a_leaking_device_round_reaches_the_server_only_without_the_guard` runs a compromised device
round (the real round, then its own canary planted in metric values and in its update's bytes)
through a ClientApp with no mods and through one with the privacy guard: the canary reaches the
wire without the guard, and not one byte of it with it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flwr.app import Message, RecordDict

from wire.messages import GLOBAL_UPDATE_KEY, SECAGG_CONFIGS
from fedasls.config import Settings
from fedasls.lm.adapter_layout import adapter_layout
from fedasls.federated.split import is_shared, shared_part_of
from tests.recording_grid import run_recorded
from server.rounds import FleetRun

pytestmark = pytest.mark.integration  # real runs on Flower + Ray (module fixture)

DEVICES = 6
MODES = [  # (strategy, ffa, user-level DP, example-level DP-SGD, SecAgg+, devices per worker slot)
    ("global", False, False, False, False, 2),  # first: its worker slots start without torch imported
    ("local", False, False, False, False, 1),
    ("local", False, False, True, False, 1),
    ("global", False, False, False, False, 1),  # the same run, one device per message
    ("global", False, True, False, False, 1),
    ("global", True, True, False, False, 1),
    ("global+personal", False, False, False, False, 1),
    ("global+personal", False, True, True, False, 1),
    ("global", False, False, False, True, 1),
    ("global+personal", False, False, True, True, 1),
]
SECAGG_RECORDS = {SECAGG_CONFIGS, "fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}


TOPICS = ["How should I plan my monthly savings budget", "Which running shoes suit long trail races",
          "What is a quick vegetarian dinner for two", "How do I keep basil fresh on the windowsill",
          "When should I repot a small lemon tree", "How can I sleep better before an early flight",
          "What should I pack for a rainy mountain weekend"]
ANSWERS = ["Save a fixed share first and track spending weekly", "Pick cushioned shoes with a grippy outsole",
           "Try lentil curry with rice and spinach", "Keep the stems in water away from direct heat",
           "Repot in spring into a slightly larger pot", "Dim the lights and skip caffeine after noon",
           "Bring a waterproof jacket and spare socks"]


def canary(device: int, index: int, part: str) -> str:
    return f"CANARY{device:02d}X{index:03d}{part}Z"


@pytest.fixture(scope="module")
def canary_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("canary-data") / "canary.jsonl"
    with data.open("w") as f:
        for device in range(DEVICES):
            for i in range(14):
                f.write(json.dumps({
                    "user_id": f"user-{device}",
                    "instruction": f"{TOPICS[i % len(TOPICS)]} {canary(device, i, 'Q')}?",
                    "output": f"{ANSWERS[i % len(ANSWERS)]} {canary(device, i, 'A')}.",
                }) + "\n")
    return data


def canary_settings(tiny_model_dir, data, strategy="global", ffa=False, dp=False, dp_sgd=False, secagg=False,
                    per_worker=1) -> Settings:
    return Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"source": "jsonl", "jsonl_path": str(data), "partition": "user", "num_devices": DEVICES,
                       "heldout": 2},
        "feedback": {"annotation_budget": 4},
        "synthesis": {"rewrites": 1, "method": "fallback"},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 1, "min_items": 2, "gate": "off", "dp": dp_sgd,
                       "max_length": 48},
        "evaluation": {"max_new_tokens": 4},
        "heterogeneity": {"availability": "always", "dropout_scale": 0.0},
        "simulation": {"rounds": 2, "cohort_size": 3, "overcommit": 1.0, "start_time_s": 9 * 86400.0,
                       "round_interval_s": 86400.0, "workers": 2, "devices_per_worker": per_worker,
                       "sampling": "poisson" if dp else "available"},
        "federated": {"strategy": strategy, "ffa": ffa, "dp": dp, "noise_multiplier": 0.8, "clip_norm": 0.05,
                      "secure_aggregation": "secagg+" if secagg else "none"},
    })


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, canary_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    runs = []
    for strategy, ffa, dp, dp_sgd, secagg, per_worker in MODES:
        settings = canary_settings(tiny_model_dir, canary_data, strategy, ffa, dp, dp_sgd, secagg, per_worker)
        name = f"{'secagg-' if secagg else ''}{strategy}-ffa{int(ffa)}-dp{int(dp)}-sgd{int(dp_sgd)}" + (
            f"-batch{per_worker}" if per_worker > 1 else "")
        runs.append((name, FleetRun(settings, root / name, root / name / "store", quiet=True, expected_slots=3)))

    return runs, run_recorded(runs, 3)


def test_no_canary_in_any_byte_the_server_received(recorded):
    runs, received = recorded
    assert {mode for mode, _, _ in received} == {name for name, _ in runs}
    planted = [canary(d, i, p).encode() for d in range(DEVICES) for i in range(14) for p in "QA"]
    for mode, wire, _ in received:
        assert b"CANARY" not in wire, mode
        assert not any(c in wire for c in planted), mode


def test_replies_hold_only_metrics_and_updates_of_the_global_layout(recorded):
    runs, received = recorded
    settings = dict(runs)
    updates = {name: 0 for name, _ in runs}
    for mode, _, reply in received:
        assert not reply.has_error(), (mode, reply.error if reply.has_error() else None)
        keys = set(reply.content.keys())
        f = settings[mode].settings.federated
        if f.secure_aggregation == "secagg+":  # protocol records only; the update leaves masked, never in clear
            assert keys <= SECAGG_RECORDS and SECAGG_CONFIGS in keys, (mode, keys)
            if "fitres.parameters" in keys:
                assert len(reply.content["fitres.parameters"]) == 0, mode  # emptied: the mod sent it masked
                updates[mode] += 1
            continue
        batch = settings[mode].settings.simulation.devices_per_worker > 1
        ran = reply.content["metrics"]["device_id"]
        allowed = {f"{GLOBAL_UPDATE_KEY}.{d}" for d in ran} if batch else {GLOBAL_UPDATE_KEY}
        assert keys <= {"metrics"} | allowed, (mode, keys)
        shared = shared_part_of(f.strategy, f.ffa) if f.strategy != "local" else None
        for key in keys - {"metrics"}:
            assert f.strategy != "local", mode
            updates[mode] += 1
            layout = {k: v for k, v in adapter_layout(settings[mode].settings).items() if is_shared(k, shared)}
            record = reply.content[key]
            assert [(k, tuple(a.shape)) for k, a in record.items()] == list(layout.items()), mode
            assert all(a.dtype == "float32" for a in record.values())
    assert all(n > 0 for name, n in updates.items() if not name.startswith("local")), updates
    assert all(n == 0 for name, n in updates.items() if name.startswith("local")), updates


def test_dp_runs_report_user_level_epsilon_with_its_assumptions(recorded):
    runs, _ = recorded
    for name, run in runs:
        rounds = [json.loads(line) for line in (run.run_dir / "rounds.jsonl").read_text().splitlines()]
        assert len(rounds) == 2
        if run.settings.federated.dp:
            eps = [r["user_epsilon"] for r in rounds]
            assert 0 < eps[0] < eps[1] and all(math.isfinite(e) for e in eps)
            privacy = json.loads((run.run_dir / "privacy.json").read_text())
            assert privacy["epsilon"] == pytest.approx(eps[-1]) and privacy["sampling"] == "poisson"
            assert "delta = 1e-05" in privacy["report"] and "add/remove" in privacy["report"]
        else:
            assert "user_epsilon" not in rounds[0] and not (run.run_dir / "privacy.json").exists()
        if run.settings.federated.secure_aggregation == "secagg+":  # the masked sum was recovered and applied
            assert all(r["secagg_ok"] == 1 for r in rounds) and sum(r["contributors"] for r in rounds) > 0, name


def test_two_devices_per_message_give_the_same_global_adapter(recorded):
    from safetensors.torch import load_file

    runs = dict(recorded[0])
    one, two = runs["global-ffa0-dp0-sgd0"], runs["global-ffa0-dp0-sgd0-batch2"]
    rounds = [[json.loads(x) for x in (r.run_dir / "rounds.jsonl").read_text().splitlines()] for r in (one, two)]
    assert [r["contributors"] for r in rounds[0]] == [r["contributors"] for r in rounds[1]]
    assert sum(r["contributors"] for r in rounds[0]) >= 2
    final = [load_file(str(r.run_dir / "global-adapter" / "round-00002.safetensors")) for r in (one, two)]
    assert list(final[0]) == list(final[1])
    assert all(torch.allclose(final[0][k], final[1][k], atol=1e-6) for k in final[0])
    assert any(torch.count_nonzero(v) for k, v in final[0].items() if "lora_B" in k)  # it did move from B = 0


def leaky_train(msg, context):
    """A compromised device round: the real round (clients.app.train), then the device's own canary,
    read from its data in its store, planted in a metric's values (its code points) and in the
    first bytes of its update (as float32 bytes)."""
    import re

    import numpy as np
    from flwr.app import ArrayRecord, MetricRecord

    from clients.app import train, worker_resources
    from fedasls.device.round import load_device
    from fedasls.device.store import DeviceStore

    reply = train(msg, context)
    config = msg.content["config"]
    settings, runtime, hetero = worker_resources(str(config["settings"]))
    device = load_device(int(config["device-id"]), runtime, settings, DeviceStore(str(config["store"])), hetero)
    secret = re.search(r"CANARY\w+?Z", device.selector.interactions()[0].question).group()
    metrics = dict(reply.content["metrics"]) | {"rouge1": [float(ord(c)) for c in secret]}
    arrays = {k: a.numpy().copy() for k, a in reply.content[GLOBAL_UPDATE_KEY].items()}
    first = next(iter(arrays.values())).reshape(-1).view(np.uint8)
    first[:len(secret)] = np.frombuffer(secret.encode(), dtype=np.uint8)
    reply.content["metrics"] = MetricRecord(metrics)
    reply.content[GLOBAL_UPDATE_KEY] = ArrayRecord({k: torch.from_numpy(a) for k, a in arrays.items()})
    return reply


def test_a_leaking_device_round_reaches_the_server_only_without_the_guard(tiny_model_dir, canary_data, tmp_path):
    import struct

    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import secagg_route
    from clients.guard import privacy_guard
    from fedasls.device.faults import FailureCode
    from fedasls.federated.strategies import FedAvg
    from server.rounds import round_config
    from wire.messages import downlink_records

    settings = canary_settings(tiny_model_dir, canary_data)
    layout = adapter_layout(settings)
    downlink = downlink_records(FedAvg(settings.federated, layout, 4).configure_train(1, [2]))
    planted = [canary(2, i, p) for i in range(14) for p in "QA"]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    try:
        received = {}
        for name, mods in (("unguarded", []), ("guarded", [privacy_guard])):
            app = ClientApp(mods=mods)
            app.train(mods=[secagg_route])(leaky_train)
            content = round_config(settings.model_dump_json(), tmp_path / name, 2, 9 * 86400.0, 1, False)
            for key, record in downlink.items():
                content[key] = record
            msg = Message(content, dst_node_id=1, message_type="train")
            reply = app(msg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
            wire = message_to_proto(reply).SerializeToString()
            received[name] = (wire, message_from_proto(ProtoMessage.FromString(wire)))
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None

    wire, reply = received["unguarded"]  # the canary reaches the server, in metric values and update bytes
    secret = "".join(chr(int(v)) for v in reply.content["metrics"]["rouge1"])
    assert secret in planted
    assert struct.pack(f"<{len(secret)}d", *(float(ord(c)) for c in secret)) in wire
    first = next(iter(reply.content[GLOBAL_UPDATE_KEY].values())).numpy().tobytes()
    assert first.startswith(secret.encode()) and secret.encode() in wire

    wire, reply = received["guarded"]  # with the guard: the REFUSED code, and zero bytes of any canary
    assert reply.has_error() and reply.error.code == FailureCode.REFUSED
    assert b"CANARY" not in wire and not any(c.encode() in wire for c in planted)
    assert struct.pack(f"<{len(secret)}d", *(float(ord(c)) for c in secret)) not in wire
