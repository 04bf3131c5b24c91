"""`fedasls sweep privacy`: the utility of the DP-released global adapter on new devices, over noise draws.

The quick tests check the aggregation (bootstrap over draws and devices, per-level rows, outputs) on
synthetic point results; the integration test runs a real tiny sweep (1 noise level x 3 draws + the
no-noise reference, 1 round, then one production-regime run) on Flower + Ray.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from simulations.sweep import (COLUMNS, NO_NOISE, bootstrap_mean_ci, new_device_ids, point_result, summarize,
                               write_outputs)


def _point(z, draw, shift, finetuned_shift=0.0, eps=1.5):
    devices = [{"device_id": 10 + d, "lora_rank": 4, "base_rouge1": 0.5 + 0.01 * d,
                "global_rouge1": 0.5 + 0.01 * d + shift,
                "finetuned_rouge1": (math.nan if d == 3 else 0.6 + 0.01 * d + finetuned_shift),
                "finetune_status": "waiting" if d == 3 else "accepted"} for d in range(4)]
    dp = z != NO_NOISE
    return {"noise_multiplier": z, "epsilon": eps if dp else math.inf, "delta": 1e-3, "sampling": "poisson",
            "sample_rate": 0.25 if dp else math.nan, "neighbouring": "add/remove",
            "accountant": "dp-accounting PLD (upper bound)" if dp else "none (no noise)", "rounds": 2,
            "regime": "simulated" if dp else "no noise (reference)", "snr_mean": 0.1 if dp else math.inf,
            "contributors_mean": 3.0, "failed_device_rounds": 0, "report": f"epsilon = {eps}" if dp else "none",
            "run_dir": f"runs/{z}-{draw}", "devices": devices}


def test_bootstrap_over_draws_and_devices():
    table = np.array([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, np.nan]])
    mean, low, high = bootstrap_mean_ci(table)
    assert mean == pytest.approx(np.nanmean(table)) and low < mean < high
    one = bootstrap_mean_ci(np.array([[0.1, 0.3, 0.5]]))  # one draw: over devices only
    assert one[0] == pytest.approx(0.3) and one[1] < 0.3 < one[2]
    assert bootstrap_mean_ci(np.array([[0.4]])) == (0.4, 0.4, 0.4)
    assert all(math.isnan(v) for v in bootstrap_mean_ci(np.full((2, 2), np.nan)))
    # draws that disagree widen the interval beyond the devices-only one
    spread = np.array([[0.0, 0.1, 0.2], [0.5, 0.6, 0.7]])
    tight = bootstrap_mean_ci(spread[:1])
    wide = bootstrap_mean_ci(spread)
    assert wide[2] - wide[1] > tight[2] - tight[1]


def test_summary_rows_per_level_with_paired_differences(tmp_path):
    points = [_point(NO_NOISE, 0, 0.10)] + [_point(1.0, d, 0.02 * d, finetuned_shift=-0.01 * (d + 1))
                                              for d in range(3)]
    rows = summarize(points)
    assert [r["noise_multiplier"] for r in rows] == [NO_NOISE, 1.0]
    ref, dp = rows
    assert ref["draws"] == 1 and dp["draws"] == 3 and dp["new_devices"] == 4 and dp["finetuned_devices"] == 3
    assert ref["cold_uplift"] == pytest.approx(0.10) and ref["cold_vs_reference"] == pytest.approx(0.0)
    assert dp["cold_uplift"] == pytest.approx(0.02)  # mean of 0, 0.02, 0.04
    assert dp["cold_vs_reference"] == pytest.approx(0.02 - 0.10)
    assert dp["finetuned_vs_reference"] == pytest.approx(-0.02)  # paired, over the 3 devices that trained
    assert dp["finetuned_uplift"] == pytest.approx(0.1 - 0.02)
    assert dp["per_draw_means"]["cold_uplift"] == pytest.approx([0.0, 0.02, 0.04])
    assert dp["cold_uplift_draw_sd"] == pytest.approx(0.02)
    for r in rows:
        for m in ("cold_rouge1", "cold_uplift", "finetuned_rouge1", "finetuned_vs_reference"):
            assert r[f"{m}_low"] <= r[m] + 1e-12 and r[m] <= r[f"{m}_high"] + 1e-12, (r["noise_multiplier"], m)
    assert dp["cold_uplift_low"] < dp["cold_uplift_high"]  # the draws' spread is in the interval
    write_outputs(rows, tmp_path)
    for name in ("privacy_sweep.csv", "privacy_sweep.json", "epsilon_vs_utility.png", "snr_by_noise.png"):
        assert (tmp_path / name).stat().st_size > 0
    header = (tmp_path / "privacy_sweep.csv").read_text().splitlines()[0].split(",")
    assert header == list(COLUMNS)
    saved = json.loads((tmp_path / "privacy_sweep.json").read_text())
    assert "over draws and devices" in saved["ci_method"] and len(saved["rows"]) == 2


def test_point_result_refuses_an_unfinished_or_unevaluated_run(tmp_path, make_settings):
    settings = make_settings(simulation={"rounds": 1})
    crashed = tmp_path / "crashed"  # e.g. Ray failed to start: no round recorded
    crashed.mkdir()
    (crashed / "rounds.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="did not finish"):
        point_result(crashed, settings, 2)
    (crashed / "rounds.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(RuntimeError, match="not evaluated"):
        point_result(crashed, settings, 2)


def test_sweep_refuses_settings_that_would_fake_draws(tmp_path, make_settings):
    from simulations.sweep import sweep_privacy

    with pytest.raises(ValueError, match="noise_seed"):
        sweep_privacy(make_settings(federated={"noise_seed": 3}), [1.0], tmp_path)
    with pytest.raises(ValueError, match="calibrate_epsilon"):
        sweep_privacy(make_settings(federated={"calibrate_epsilon": 2.0}), [1.0], tmp_path)
    with pytest.raises(ValueError, match="draws"):
        sweep_privacy(make_settings(), [1.0], tmp_path, draws=0)
    assert new_device_ids(make_settings(population={"num_devices": 5}), 3) == [5, 6, 7]


# ------------------------------------------------------------------ a real tiny sweep


def _tiny(make_settings, **federated):
    return make_settings(
        population={"num_devices": 6, "stream_length": 40, "heldout": 2},
        feedback={"annotation_budget": 4},
        synthesis={"rewrites": 1, "method": "fallback"},
        adaptation={"epochs": 1, "lora_rank": 4, "min_new_items": 1, "min_items": 2, "max_length": 48},
        evaluation={"max_new_tokens": 4},
        heterogeneity={"availability": "always", "dropout_scale": 0.0},
        simulation={"rounds": 1, "cohort_size": 3, "overcommit": 1.0, "start_time_s": 9 * 86400.0,
                    "round_interval_s": 86400.0, "workers": 2},
        federated={"strategy": "global", "clip_norm": 0.05, "delta": 1e-3, **federated},
    )


@pytest.mark.integration
def test_sweep_reports_the_released_adapters_utility_over_draws(make_settings, tmp_path):
    from safetensors.torch import load_file

    from fedasls.privacy.user_level import UserLevelAccountant
    from simulations.sweep import sweep_privacy

    settings = _tiny(make_settings)
    out = tmp_path / "sweep"
    rows = sweep_privacy(settings, [1.0], out, draws=3, new_devices=3, progress=False)
    ref, dp = rows
    assert ref["noise_multiplier"] == NO_NOISE and ref["draws"] == 1 and ref["epsilon"] == math.inf
    assert dp["noise_multiplier"] == 1.0 and dp["draws"] == 3 and dp["new_devices"] == 3
    for r in rows:  # per-level utilities of cold-start and fine-tuned new devices, with CIs
        for m in ("cold_rouge1", "cold_uplift", "finetuned_rouge1", "finetuned_vs_reference"):
            assert math.isfinite(r[m]) and r[f"{m}_low"] <= r[m] + 1e-12 <= r[f"{m}_high"] + 2e-12, (m, r)
        assert r["finetuned_devices"] >= 1
    evals = [json.loads((out / "runs" / f"noise-1-draw-{d}" / "released_eval.json").read_text()) for d in range(3)]
    assert all(e["new_devices"] == [6, 7, 8] for e in evals)
    # the draws differ: three different released adapters (fresh secret noise each run)
    adapters = [load_file(str(out / "runs" / f"noise-1-draw-{d}" / "global-adapter" / "round-00001.safetensors"))
                for d in range(3)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(adapters[a][k], adapters[b][k]) for k in adapters[a])
    # epsilon is the accountant's for this z, q and number of rounds
    q = settings.simulation.cohort_size / settings.population.num_devices
    acc = UserLevelAccountant(1.0, 1e-3, "add/remove", accountant="pld")
    acc.compose(q, 1)
    assert dp["epsilon"] == pytest.approx(acc.epsilon()) and dp["sample_rate"] == pytest.approx(q)
    assert "PLD" in dp["accountant"] and "delta = 0.001" in dp["reports"][0] and "poisson" in dp["reports"][0].lower()
    assert dp["regime"].startswith("simulated")
    with (out / "privacy_sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["noise_multiplier"] for t in table] == ["none", "1.0"] and "finetuned_vs_reference_low" in table[0]
    # resumable: finished, evaluated points are reused (nothing runs again)
    again = sweep_privacy(settings, [1.0], out, draws=3, new_devices=3, progress=False)
    assert again[1]["cold_uplift"] == dp["cold_uplift"] and again[1]["epsilon"] == dp["epsilon"]

    # the production regime: epsilon and noise of 1,000 devices a round of 1,000,000
    prod = sweep_privacy(_tiny(make_settings, noise_cohort_size=1000, noise_population_size=1_000_000), [1.0],
                         tmp_path / "prod", draws=1, new_devices=2, include_no_noise=False, progress=False)
    assert len(prod) == 1 and prod[0]["regime"].startswith("production regime")
    assert "1000 devices a round of 1000000" in prod[0]["regime"]
    acc = UserLevelAccountant(1.0, 1e-3, "add/remove", accountant="pld")
    acc.compose(1e-3, 1)
    assert prod[0]["epsilon"] == pytest.approx(acc.epsilon()) and prod[0]["sample_rate"] == pytest.approx(1e-3)
    assert "production regime" in prod[0]["reports"][0]
