"""SecAgg+ in a real Flower simulation: the same seeded run with plain FedAvg and with Flower's
SecAgg+ workflow gives the same global adapter within the quantization error, and no single
device's update is in any byte the server receives under SecAgg+.

One Simulation Engine run (Ray) serves both modes through one ServerApp whose grid records the
wire bytes of every reply. 6 devices, 5 sampled per round on 5 worker slots, the 4 fastest count:
the 5th is a straggler, which SecAgg+ must treat as a dropout (its masked vector taken out).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from safetensors.torch import load_file

from wire.messages import FITRES_EXAMPLES, GLOBAL_UPDATE_KEY, SECAGG_CONFIGS
from fedasls.config import Settings
from tests.recording_grid import run_recorded
from server.rounds import FleetRun
from server.secagg import quantization_bound

pytestmark = pytest.mark.integration  # a real SecAgg+ run on Flower (module fixture)

SLOTS = 5


TOPICS = ["How should I plan my monthly savings budget", "Which running shoes suit long trail races",
          "What is a quick vegetarian dinner for two", "How do I keep basil fresh on the windowsill",
          "When should I repot a small lemon tree", "How can I sleep better before an early flight"]
ANSWERS = ["Save a fixed share first and track spending weekly", "Pick cushioned shoes with a grippy outsole",
           "Try lentil curry with rice and spinach", "Keep the stems in water away from direct heat",
           "Repot in spring into a slightly larger pot", "Dim the lights and skip caffeine after noon"]


def write_users(path, devices: int = 6, items: int = 10) -> None:
    with path.open("w") as f:
        for device in range(devices):
            for i in range(items):
                f.write(json.dumps({"user_id": f"user-{device}",
                                    "instruction": f"{TOPICS[(i + device) % len(TOPICS)]} (case {device}-{i})?",
                                    "output": f"{ANSWERS[(i + 2 * device) % len(ANSWERS)]}, case {i}."}) + "\n")


def settings_for(tiny_model_dir, data, mode: str) -> Settings:
    return Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"source": "jsonl", "jsonl_path": str(data), "partition": "user", "num_devices": 6,
                       "heldout": 2},
        "feedback": {"annotation_budget": 4},
        "synthesis": {"rewrites": 1, "method": "fallback"},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 1, "min_items": 2, "gate": "off",
                       "max_length": 48},
        "evaluation": {"max_new_tokens": 4},
        "heterogeneity": {"availability": "always", "dropout_scale": 0.0},
        "simulation": {"rounds": 1, "cohort_size": 4, "overcommit": 1.25, "start_time_s": 9 * 86400.0,
                       "round_interval_s": 86400.0, "workers": 2},
        "federated": {"strategy": "global", "clip_norm": 0.05, "secure_aggregation": mode,
                      "secagg_max_weight": 50.0},
    })


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    write_users(root / "users.jsonl")
    runs = [(mode, FleetRun(settings_for(tiny_model_dir, root / "users.jsonl", mode), root / mode, root / mode / "store", quiet=True,
                            expected_slots=SLOTS)) for mode in ("none", "secagg+")]
    return dict(runs), run_recorded(runs, SLOTS)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_secagg_global_adapter_equals_plain_fedavg_within_the_quantization_error(recorded):
    runs, received = recorded
    plain, secure = runs["none"], runs["secagg+"]
    rounds = {m: read_jsonl(r.run_dir / "rounds.jsonl") for m, r in runs.items()}
    assert rounds["secagg+"][0]["secagg_ok"] == 1 and rounds["secagg+"][0]["stragglers"] == 1
    assert rounds["secagg+"][0]["secagg_dropouts"] == 1  # the straggler left the protocol before unmasking
    assert rounds["secagg+"][0]["contributors"] == rounds["none"][0]["contributors"] >= 2
    # the per-device scalar metrics still reached the server (FitRes metrics are not masked)
    rows = {m: read_jsonl(r.run_dir / "device_rounds.jsonl") for m, r in runs.items()}
    assert [(r["device_id"], r["role"], r["examples"]) for r in rows["secagg+"]] == \
           [(r["device_id"], r["role"], r["examples"]) for r in rows["none"]]

    # the plain run uploads in two phases: the update comes in the phase-2 reply (metrics: the device id),
    # its example count in the device's round row
    examples = {r["device_id"]: r["examples"] for r in rows["none"] if r["role"] == "completed"}
    updates = [(examples[reply.content["metrics"]["device_id"]], reply.content[GLOBAL_UPDATE_KEY])
               for mode, _, reply in received if mode == "none" and not reply.has_error()
               and GLOBAL_UPDATE_KEY in reply.content and reply.content["metrics"]["device_id"] in examples]
    weights = [min(float(w), 50.0) for w, _ in updates] + [0.0] * (4 - len(updates))  # weight-0: no update
    largest = max(float(np.abs(a.numpy()).max()) for _, rec in updates for a in rec.values())
    bound = quantization_bound(weights, 0.05, 50.0, 2**22, largest)
    a = load_file(str(plain.run_dir / "global-adapter" / "round-00001.safetensors"))
    b = load_file(str(secure.run_dir / "global-adapter" / "round-00001.safetensors"))
    assert set(a) == set(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    step = rounds["none"][0]["global_step_norm"]
    print(f"SecAgg+ vs plain FedAvg: max |difference| {diff:.3g}, bound {bound:.3g}, step norm {step:.3g}")
    assert diff <= bound + 1e-7, (diff, bound)
    assert step > 1000 * bound  # the round really moved the adapter: the agreement is not trivial
    assert rounds["secagg+"][0]["global_step_norm"] == pytest.approx(step, rel=1e-3)


def test_no_single_update_in_what_the_server_receives_under_secagg(recorded):
    runs, received = recorded
    plain_updates = [reply.content[GLOBAL_UPDATE_KEY] for mode, _, reply in received
                     if mode == "none" and not reply.has_error() and GLOBAL_UPDATE_KEY in reply.content]
    assert plain_updates
    needles = []  # 32 bytes of each plain device update's float32 values (the same seeded devices)
    for record in plain_updates:
        for arr in record.values():
            flat = arr.numpy().ravel()
            nz = np.flatnonzero(flat)
            if len(nz) >= 8:
                needles.append(flat[nz[0]:nz[0] + 8].tobytes())
    assert needles
    secure = [(wire, reply) for mode, wire, reply in received if mode == "secagg+"]
    assert len(secure) == 4 * SLOTS - 1  # four protocol stages, one reply per slot; the straggler is not unmasked
    masked = 0
    for wire, reply in secure:
        assert not reply.has_error()
        assert GLOBAL_UPDATE_KEY not in reply.content and SECAGG_CONFIGS in reply.content
        assert not any(n in wire for n in needles)
        if FITRES_EXAMPLES in reply.content:
            assert all(len(rec) == 0 for name, rec in reply.content.array_records.items())  # parameters emptied
            vector = [bytes_to_ndarray(b) for b in reply.content[SECAGG_CONFIGS]["masked_params"]]
            values = np.concatenate([v.ravel() for v in vector[1:]])
            # A quantized update lies in [0, 2**22]; masked values are uniform modulo 2**32.
            assert (values > 2**22).mean() > 0.98
            masked += 1
    assert masked == SLOTS
