"""Two-phase upload on Flower + Ray (tiny model, 6 devices, K = 4 of 6 sampled, 2 rounds): the
stragglers beyond the K fastest never upload, and the run releases the same global adapter, bit
for bit, with the same completed/straggler counts as a one-phase run (seeded, without DP and with
DP under a noise_seed, where Poisson sampling leaves no K-fastest stragglers: the same release)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simulations.runner import simulate
from tests.tiny_fleet import tiny_fleet_settings

pytestmark = pytest.mark.integration  # real runs on Flower + Ray


def run(tiny_model_dir: Path, out: Path, upload: str, federated: dict, on_reply=None) -> Path:
    settings = tiny_fleet_settings(tiny_model_dir, federated=federated, simulation={
        "rounds": 2, "cohort_size": 4, "overcommit": 1.5, "start_time_s": 259200.0,
        "sampling": "poisson" if federated.get("dp") else "available",
        "round_interval_s": 259200.0, "workers": 1, "upload": upload, "output_dir": str(out)})
    return simulate(settings, out / upload, quiet=True, on_reply=on_reply).run_dir


def records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    entry = json.loads((run_dir / "checkpoint.json").read_text())["strategy"]
    return load_file(str(run_dir / entry["adapter_file"]))


@pytest.mark.parametrize("federated", [{}, {"dp": True, "noise_multiplier": 1.0, "delta": 1e-3, "noise_seed": 11}],
                         ids=["no-dp", "dp-noise-seed"])
def test_two_phase_releases_the_one_phase_adapter_and_stragglers_do_not_upload(tiny_model_dir, tmp_path,
                                                                              monkeypatch, federated):
    monkeypatch.setenv("FEDASLS_PRIVATE_DIR", str(tmp_path / "private"))
    one, two = (run(tiny_model_dir, tmp_path / "results", upload, federated) for upload in ("one-phase", "two-phase"))
    want, got = adapter(one), adapter(two)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    r1, r2 = records(one, "rounds.jsonl"), records(two, "rounds.jsonl")
    for a, b in zip(r1, r2):
        assert (a["completed"], a["stragglers"], a["dropped"]) == (b["completed"], b["stragglers"], b["dropped"])
        assert a["global_step_norm"] == b["global_step_norm"]
    assert sum(r["global_step_norm"] for r in r2) > 0 and sum(r["fetched"] for r in r2) > 0  # phase 2 ran
    if federated.get("dp"):  # DP needs Poisson sampling: every sampled device counts, no K-fastest cut
        return
    assert sum(r["stragglers"] for r in r2) > 0  # over-commitment left stragglers
    devices = records(two, "device_rounds.jsonl")
    # a straggler that trained kept its update: nothing of it was sent; every completed device's was
    late = [d for d in devices if d["role"] == "straggler" and d["adapted"]]
    assert late and all(d["withheld_bytes"] > 10_000 for d in late)
    assert all(d["withheld_bytes"] == 0 for d in devices if d["role"] == "completed")
    for r in r2:  # phase 2 asked exactly the completed devices that trained, and each sent its update
        trained = [d for d in devices if d["round"] == r["round"] and d["role"] == "completed" and d["adapted"]]
        assert r["fetched"] == len(trained) and r["fetch_failed"] == 0
    saved = sum(d["withheld_bytes"] for d in late)
    assert sum(r["uplink_bytes"] for r in r1) - sum(r["uplink_bytes"] for r in r2) == saved


def test_a_device_that_lost_its_kept_update_is_a_counted_dropout(tiny_model_dir, tmp_path):
    """Every kept update is deleted as soon as the server has its phase-1 reply (state lost between
    the phases): phase 2 gets NO_KEPT_UPDATE from each asked device, nothing is aggregated, the
    round is recorded with the failures counted and the run goes on."""
    store = tmp_path / "results" / "two-phase" / "store"

    def lose(reply) -> None:
        if not reply.has_error() and reply.content["metrics"].get("withheld_bytes", 0) > 0:
            for path in store.rglob(f"device-{int(reply.content['metrics']['device_id'])}/kept-update-*"):
                path.unlink()

    two = run(tiny_model_dir, tmp_path / "results", "two-phase", {}, on_reply=lose)
    rounds, devices = records(two, "rounds.jsonl"), records(two, "device_rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    lost = [d for d in devices if d["role"] == "completed" and d["adapted"]]
    assert lost and all(d["fetch_failure"] == "no_kept_update" for d in lost)
    assert sum(r["fetch_failed"] for r in rounds) == len(lost) and sum(r["fetched"] for r in rounds) == 0
    assert all(r["global_step_norm"] == 0 for r in rounds)  # nothing reached the aggregate
