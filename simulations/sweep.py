"""`fedasls sweep privacy`: one scenario over a grid of noise multipliers (user-level DP-FedAvg).

Each grid point is a full fleet run (Flower Simulation Engine on Ray) of the scenario with
[federated] dp = true, [simulation] sampling = "poisson" and the point's noise multiplier; the
point "none" is the same run without noise (dp off, same Poisson sampling) as the utility
reference. Utility = each device's personalization uplift (held-out ROUGE-1 of its model, which
starts from the global adapter, minus the base model's) at its last completed round, mean with a
bootstrap 95% CI over devices. Written to the results folder:

    privacy_sweep.csv   noise, epsilon (delta, sampling, relation), uplift mean/CI, mean SNR, rounds
    privacy_sweep.json  the same plus every epsilon's full report string
    epsilon_vs_utility.png, snr_by_noise.png
    runs/<point>/       each point's own run folder

`--jobs N` runs N points in parallel processes (each with its own Ray instance). Points already
finished in the results folder (all rounds recorded) are reused, so a sweep can be re-run to
complete the points that failed.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fedasls.config import Settings
from fedasls.stats import mean_ci

NO_NOISE = "none"


def point_settings(base: Settings, noise: float | None) -> Settings:
    """The scenario at one grid point (noise None = no DP; Poisson sampling in both cases)."""
    data = base.model_dump()
    data["simulation"]["sampling"] = "poisson"
    if data["federated"]["strategy"] == "local":
        data["federated"]["strategy"] = "global"
        del data["adaptation"]["lora_scaling"]  # the global-adapter default (uniform), not local's
    data["federated"]["dp"] = noise is not None
    if noise is not None:
        data["federated"]["noise_multiplier"] = float(noise)
        data["federated"]["release_diagnostics"] = True  # the SNR plot: a diagnostic outside the epsilon
    return Settings.model_validate(data)


def _run_point(settings_json: str, run_dir: str) -> dict[str, Any]:
    from simulations.runner import simulate

    settings = Settings.model_validate_json(settings_json)
    run = simulate(settings, Path(run_dir), quiet=True)
    return point_result(run.run_dir, settings)


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def finished(run_dir: Path, settings: Settings) -> bool:
    """All rounds recorded (or the run stopped at its target epsilon, which privacy.json says)."""
    rounds = _rounds(run_dir)
    if len(rounds) >= settings.simulation.rounds:
        return True
    target = settings.federated.target_epsilon
    privacy = run_dir / "privacy.json"
    return bool(rounds) and bool(target) and privacy.is_file() and json.loads(privacy.read_text())["steps"] == len(rounds)


def point_result(run_dir: Path, settings: Settings) -> dict[str, Any]:
    """Utility, epsilon and SNR of one finished run folder (RuntimeError if it did not finish)."""
    if not finished(run_dir, settings):
        raise RuntimeError(f"grid point {run_dir} did not finish its {settings.simulation.rounds} rounds "
                           f"({len(_rounds(run_dir))} recorded; e.g. Ray failed to start): run the sweep again to "
                           "redo the unfinished points")
    rounds = _rounds(run_dir)
    rows = [json.loads(x) for x in (run_dir / "device_rounds.jsonl").read_text().splitlines() if x.strip()]
    latest: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.get("status_code") == 0 and row.get("role") == "completed":
            latest[row["device_id"]] = row
    uplift = [r["rouge1"] - r["base_rouge1"] for r in latest.values() if not math.isnan(r["rouge1"] - r["base_rouge1"])]
    mean, low, high = mean_ci(uplift) if uplift else (math.nan, math.nan, math.nan)
    f = settings.federated
    privacy_file = run_dir / "privacy.json"
    privacy = json.loads(privacy_file.read_text()) if privacy_file.is_file() else None
    snrs = [r["snr"] for r in rounds if "snr" in r and math.isfinite(r["snr"])]
    return {
        "noise_multiplier": f.noise_multiplier if f.dp else NO_NOISE,
        "epsilon": privacy["epsilon"] if privacy else math.inf,
        "delta": f.delta,
        "sampling": "poisson",
        "neighbouring": f.neighbouring,
        "rounds": len(rounds),
        "devices": len(uplift),
        "uplift_rouge1": mean,
        "uplift_low": low,
        "uplift_high": high,
        "snr_mean": sum(snrs) / len(snrs) if snrs else math.inf,
        "contributors_mean": sum(r.get("contributors", 0) for r in rounds) / max(len(rounds), 1),
        "failed_device_rounds": sum(r.get("failed", 0) for r in rounds),
        "report": privacy["report"] if privacy else "no user-level DP (epsilon infinite)",
        "run_dir": str(run_dir),
    }


def sweep_privacy(base: Settings, noises: list[float], out_dir: Path, jobs: int = 1,
                  include_no_noise: bool = True, progress: bool = True) -> list[dict[str, Any]]:
    """Run every grid point, then write the table, JSON and plots; returns the rows (grid order)."""
    if not noises and not include_no_noise:
        raise ValueError("sweep privacy: give at least one noise multiplier (--noise 0.5 1 2)")
    if any(not (z > 0 and math.isfinite(z)) for z in noises):
        raise ValueError(f"sweep privacy: noise multipliers must be finite numbers > 0, got {noises}")
    if jobs < 1:
        raise ValueError(f"sweep privacy: --jobs must be >= 1, got {jobs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    points: list[float | None] = ([None] if include_no_noise else []) + list(noises)
    tasks, results_done = [], {}
    for i, z in enumerate(points):
        name = "noise-none" if z is None else f"noise-{z:g}"
        settings, run_dir = point_settings(base, z), out_dir / "runs" / name
        if run_dir.is_dir() and finished(run_dir, settings) and (run_dir / "config.toml").is_file():
            results_done[i] = point_result(run_dir, settings)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        tasks.append((i, settings.model_dump_json(), str(run_dir)))
    from tqdm import tqdm

    bar = tqdm(total=len(points), initial=len(results_done), desc="privacy sweep", unit="point",
               disable=not progress)
    results: list[dict[str, Any] | None] = [results_done.get(i) for i in range(len(points))]
    failures = []
    if tasks:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_point, settings_json, run_dir): i for i, settings_json, run_dir in tasks}
            from concurrent.futures import as_completed

            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except RuntimeError as err:  # one point failing never loses the others
                    failures.append(str(err))
                bar.update(1)
    bar.close()
    if failures:
        raise RuntimeError("; ".join(failures))
    rows = [r for r in results if r is not None]
    write_outputs(rows, out_dir)
    return rows


def write_outputs(rows: list[dict[str, Any]], out_dir: Path) -> None:
    with (out_dir / "privacy_sweep.csv").open("w", newline="") as f:
        keys = [k for k in rows[0] if k not in ("report", "run_dir")]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "privacy_sweep.json").write_text(json.dumps(rows, indent=2, allow_nan=True))
    plot(rows, out_dir)


def plot(rows: list[dict[str, Any]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["noise_multiplier"] != NO_NOISE]
    ref = [r for r in rows if r["noise_multiplier"] == NO_NOISE]
    fig, ax = plt.subplots(figsize=(6, 4))
    if dp:
        xs = [r["epsilon"] for r in dp]
        ys = [r["uplift_rouge1"] for r in dp]
        err = [[r["uplift_rouge1"] - r["uplift_low"] for r in dp], [r["uplift_high"] - r["uplift_rouge1"] for r in dp]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, label="DP-FedAvg (95% CI over devices)")
        for r in dp:
            ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["uplift_rouge1"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
    for r in ref:
        ax.axhspan(r["uplift_low"], r["uplift_high"], alpha=0.15, color="grey")
        ax.axhline(r["uplift_rouge1"], color="grey", linestyle="--", label="no noise (95% CI band)")
    first = (dp or ref)[0]
    ax.set_xlabel(f"user-level epsilon (delta {first['delta']:g}, Poisson sampling, {first['neighbouring']})")
    ax.set_ylabel("ROUGE-1 uplift over base")
    ax.set_title("Privacy vs utility")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "epsilon_vs_utility.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if dp:
        ax.plot([r["noise_multiplier"] for r in dp], [r["snr_mean"] for r in dp], "o-")
        ax.set_yscale("log")
    ax.set_xlabel("noise multiplier z")
    ax.set_ylabel("mean SNR of the noised sum")
    ax.set_title("||clipped sum|| / E||noise||")
    fig.tight_layout()
    fig.savefig(out_dir / "snr_by_noise.png", dpi=120)
    plt.close(fig)
