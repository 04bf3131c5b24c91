"""A real DP global-adapter run with adaptive clipping on Flower + Ray (tiny model, 6 devices, 2 rounds):
devices report their bit, the clip norm moves between rounds and is recorded, checkpointed and
accounted."""

from __future__ import annotations

import json

import pytest

from simulations.runner import simulate
from tests.tiny_fleet import tiny_fleet_settings

pytestmark = pytest.mark.integration  # a real run on Flower + Ray


def test_a_dp_run_with_adaptive_clipping_moves_records_and_accounts_its_clip_norm(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("FEDASLS_PRIVATE_DIR", str(tmp_path / "private"))
    settings = tiny_fleet_settings(tiny_model_dir, federated={
        "dp": True, "noise_multiplier": 1.0, "delta": 1e-3, "clip_norm": 0.05, "adaptive_clipping": True,
        "clipped_count_stddev": 2.0, "clip_learning_rate": 0.5,
    }, simulation={"rounds": 2, "cohort_size": 4, "sampling": "poisson", "start_time_s": 259200.0,
                   "round_interval_s": 259200.0, "workers": 1, "output_dir": str(tmp_path / "results")})
    run = simulate(settings, tmp_path / "results" / "run", quiet=True)
    rounds = [json.loads(line) for line in (run.run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["clip_norm"] == 0.05  # the configured start
    assert rounds[1]["clip_norm"] == rounds[0]["clip_norm_next"] != 0.05  # the next round used the moved C
    devices = [json.loads(line) for line in (run.run_dir / "device_rounds.jsonl").read_text().splitlines()]
    bits = [d["unclipped"] for d in devices if d["role"] == "completed"]
    assert bits and set(bits) <= {0, 1}  # every completed device reported its bit through the guard
    assert not any(d["failure"] == "refused" for d in devices)
    privacy = json.loads((run.run_dir / "privacy.json").read_text())
    assert "adaptive clipping: count noise sigma_b = 2, accounted" in privacy["report"]
    assert privacy["clip_norm"] == rounds[1]["clip_norm_next"]
    checkpoint = json.loads((run.run_dir / "checkpoint.json").read_text())
    assert checkpoint["strategy"]["clip_norm"] == rounds[1]["clip_norm_next"]  # a resume continues from it
