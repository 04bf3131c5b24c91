"""`fedasls sweep privacy`: the utility of what user-level DP-FedAvg releases, per noise multiplier.

Grid: per noise multiplier z, `draws` independent full fleet runs (Flower Simulation Engine on Ray)
of the scenario with [federated] dp = true, [simulation] sampling = "poisson" and that z. Each run
draws its noise and its Poisson sample from its own secret randomness (fedasls/privacy/secrets.py),
so the draws differ without any seed; a sweep refuses federated.noise_seed (the draws would be
one). The point "none" is one reference run without noise (dp off, the same Poisson sampling).

Utility is measured on what DP releases, the final global adapter, on `new_devices` held-out NEW
devices: ids N..N+M-1 above the training population's 0..N-1, from the same seeded population
generator (synthetic source only), which never took part in any round (fedasls/device/released.py):
- cold start: held-out ROUGE-1 of the released adapter ALONE at the device's rank, and its uplift
  over the base model (paired per device);
- fine-tuned: the device catches its stream up to the last round, runs one adaptation step starting
  from the released adapter (adaptation.gate = "off", so every device that trains keeps its
  fine-tuned copy: the score is the adapter's, never a fallback to the base model), held-out ROUGE-1,
  and its difference to the same device fine-tuned from the no-noise reference's adapter.
Intervals: 95% percentile bootstrap over draws AND devices (each replicate resamples the draws and,
independently, the devices, and averages the resampled draws x devices table); the reference has
one draw, so its interval is over devices only. Per-draw means and their across-draw standard
deviation are reported too. Epsilon per noise level: the runs' own accountant (PLD by default),
with delta, sampling rate, relation and accountant; with federated.noise_cohort_size the noise and
the epsilon are a production cohort's (e.g. 1,000 devices a round of 1,000,000) while the simulation
trained its small cohort, and the table and plot say so.

Written to the results folder:

    privacy_sweep.csv   one row per noise level (COLUMNS)
    privacy_sweep.json  the rows plus per-draw means, every epsilon report, run folders, the CI method
    epsilon_vs_utility.png  epsilon (x, log) against cold-start uplift and fine-tuned ROUGE-1 (y, 95% CIs)
    snr_by_noise.png    release diagnostic (not covered by epsilon): ||clipped sum|| / E||noise||
    runs/<point>/       each run's own folder, with released_eval.json (per new device)

With `--jobs 1` (the default) every point is trained in turn through one Simulation Engine session
(one Ray start, `train_in_one_session`); `--jobs N` > 1 runs N points in parallel processes, each
with its own Ray instance. Finished points
(all rounds recorded and released_eval.json for the same new devices) are reused; a point whose
training finished but whose evaluation did not is only evaluated, so a sweep can be re-run to
complete what failed.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedasls.config import Settings

NO_NOISE = "none"
EVAL_FILE = "released_eval.json"
CI_METHOD = ("95% percentile bootstrap over draws and devices (2000 replicates; each resamples the draws and, "
             "independently, the new devices, and averages the resampled draws x devices table; the reference run "
             "has one draw: over devices only); draw_sd = standard deviation of the per-draw means across draws")
# (metric, what it is): the utilities, each with _low / _high columns
METRICS = (
    ("cold_rouge1", "held-out ROUGE-1 of the released global adapter alone on new devices (cold start)"),
    ("cold_uplift", "cold_rouge1 - the base model's, paired per device"),
    ("cold_vs_reference", "cold_rouge1 - the no-noise reference adapter's, paired per device"),
    ("finetuned_rouge1", "held-out ROUGE-1 after one adaptation step starting from the released adapter"),
    ("finetuned_uplift", "finetuned_rouge1 - the base model's, paired per device"),
    ("finetuned_vs_reference", "finetuned_rouge1 - the same device fine-tuned from the no-noise adapter"),
)
COLUMNS = (["noise_multiplier", "draws", "epsilon", "delta", "sampling", "sample_rate", "neighbouring", "accountant",
            "rounds", "regime", "new_devices", "finetuned_devices", "base_rouge1"]
           + [f"{m}{s}" for m, _ in METRICS for s in ("", "_low", "_high")]
           + ["cold_uplift_draw_sd", "finetuned_rouge1_draw_sd", "snr_mean", "contributors_mean",
              "failed_device_rounds"])


@dataclass(frozen=True)
class Point:
    """One run of the grid: a noise multiplier (None = the no-noise reference) and its draw."""

    noise: float | None
    draw: int = 0

    @property
    def name(self) -> str:
        return "noise-none" if self.noise is None else f"noise-{self.noise:g}-draw-{self.draw}"


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


def new_device_ids(settings: Settings, new_devices: int) -> list[int]:
    """The held-out new devices: the ids just above the training population's."""
    n = settings.population.num_devices
    return list(range(n, n + new_devices))


def eval_settings(settings: Settings, new_devices: int) -> Settings:
    """The run's settings for evaluating new devices: the population extended by them (the synthetic
    generator makes every device from its own seed, so devices 0..N-1 are unchanged), gate off."""
    data = settings.model_dump()
    data["population"]["num_devices"] += new_devices
    data["adaptation"]["gate"] = "off"
    return Settings.model_validate(data)


def last_round_time(settings: Settings, rounds: int) -> float:
    """Stream time of the run's last round: what a new device has seen by then."""
    from fedasls.interaction import STREAM_EPOCH

    sim = settings.simulation
    return STREAM_EPOCH + sim.start_time_s + max(rounds - 1, 0) * sim.round_interval_s


def evaluate_released(run_dir: Path, settings: Settings, new_devices: int) -> dict[str, Any]:
    """Evaluate the run's released (final) global adapter on the new devices; write and return released_eval.json."""
    import torch

    from fedasls.device.released import finetuned_from, global_alone, load_global_adapter, released_downlink
    from fedasls.device.round import load_device
    from fedasls.device.store import DeviceStore
    from fedasls.device.worker import DeviceRuntime
    from fedasls.sim.heterogeneity import HeterogeneityModel

    torch.set_num_threads(1)
    shared, adapter_round = load_global_adapter(run_dir)
    settings_eval = eval_settings(settings, new_devices)
    downlink = released_downlink(settings_eval, shared)
    runtime = DeviceRuntime(settings_eval)
    hetero = HeterogeneityModel.from_settings(settings_eval.heterogeneity)
    until = last_round_time(settings, len(_rounds(run_dir)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DeviceStore(Path(tmp))  # empty: every new device starts fresh; nothing is saved
        for d in new_device_ids(settings, new_devices):
            device = load_device(d, runtime, settings_eval, store, hetero)
            alone = global_alone(device, downlink)
            base = device.base_eval
            tuned, status = finetuned_from(device, downlink, until)
            rows.append({"device_id": d, "lora_rank": device.lora_rank, "base_rouge1": base.rouge1,
                         "global_rouge1": alone.rouge1,
                         "finetuned_rouge1": tuned.rouge1 if tuned is not None else math.nan,
                         "finetune_status": status})
    out = {"new_devices": new_device_ids(settings, new_devices), "adapter_round": adapter_round,
           "gate": "off (fine-tuned copies are always kept)", "devices": rows}
    (run_dir / EVAL_FILE).write_text(json.dumps(out, indent=2, allow_nan=True))
    return out


def _run_point(settings_json: str, run_dir: str, new_devices: int, train: bool) -> dict[str, Any]:
    settings = Settings.model_validate_json(settings_json)
    if train:
        from simulations.runner import simulate

        simulate(settings, Path(run_dir), quiet=True)
    if not finished(Path(run_dir), settings):
        point_result(Path(run_dir), settings, new_devices)  # raises: did not finish
    evaluate_released(Path(run_dir), settings, new_devices)
    return point_result(Path(run_dir), settings, new_devices)


def train_in_one_session(items: Sequence[tuple[Settings, Path]], quiet: bool = True) -> dict[Path, str]:
    """Train several grid points through ONE Simulation Engine session (one Ray start, its worker
    slots reused): each run's folder as `simulate` writes it, the runs in turn. The points differ
    only in [federated] (noise, dp), so one worker plan serves them all. Returns {run_dir: why it
    failed} for runs that stopped on too many failed device rounds (a crash leaves runs unfinished,
    which `finished` reports)."""
    import logging
    import os
    import time

    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.rounds import FleetRun, run_fleet
    from simulations.local_ray import private_ray_dir
    from simulations.local_ray import remove as remove_private_ray_dir
    from simulations.runner import (HideRunSimulationDeprecation, attach_ray, backend_config, num_slots,
                                    plan_workers, ray_address, settings_toml, write_attribution)
    from simulations.validation import check_run_inputs, record_inputs

    model_path = check_run_inputs(items[0][0])
    runs = []
    for settings, run_dir in items:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(settings_toml(settings))
        write_attribution(settings, run_dir)
        record_inputs(settings, run_dir)
        runs.append((settings.model_copy(update={"model": settings.model.at_path(model_path)}), run_dir))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    if not any(isinstance(f, HideRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(HideRunSimulationDeprecation())
    first = runs[0][0]
    address = ray_address(first)  # an existing Ray cluster (simulation.ray_address / RAY_ADDRESS), else a private one
    plan = plan_workers(first, attach_ray(address) if address else None)
    slots = num_slots(first, plan.devices_per_worker)
    fleet_runs = []
    for settings, run_dir in runs:
        sim = settings.simulation.model_copy(update={"devices_per_worker": plan.devices_per_worker})
        settings = settings.model_copy(update={"simulation": sim})
        fleet_runs.append(FleetRun(settings, run_dir, Path(sim.store_dir) if sim.store_dir else run_dir / "store",
                                   quiet=quiet, expected_slots=slots, started=time.perf_counter()))
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for run in fleet_runs:
            run_fleet(grid, run)

    private_dir = None if address else private_ray_dir()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=slots, backend_name="ray",
                       backend_config=backend_config(first, plan, attached=address is not None,
                                                     private_dir=private_dir))
    finally:
        if private_dir is not None:
            remove_private_ray_dir(private_dir)
    return {run.run_dir: run.failure for run in fleet_runs if run.failure}


def _run_points_one_session(tasks: list[tuple[str, str, bool]], new_devices: int) -> list[dict[str, Any] | str]:
    """Train the points that need it in one session, then evaluate each: a result dict or an error text per task."""
    parsed = [(Settings.model_validate_json(s), Path(d), train) for s, d, train in tasks]
    to_train = [(s, d) for s, d, train in parsed if train]
    failed = train_in_one_session(to_train) if to_train else {}
    out: list[dict[str, Any] | str] = []
    for settings, run_dir, _ in parsed:
        try:
            if run_dir in failed:
                raise RuntimeError(f"grid point {run_dir} failed: {failed[run_dir]}")
            out.append(_run_point(settings.model_dump_json(), str(run_dir), new_devices, False))
        except (RuntimeError, FileNotFoundError) as err:
            out.append(str(err))
    return out


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


def evaluated(run_dir: Path, settings: Settings, new_devices: int) -> bool:
    """released_eval.json exists for these new devices."""
    path = run_dir / EVAL_FILE
    return path.is_file() and json.loads(path.read_text()).get("new_devices") == new_device_ids(settings, new_devices)


def point_result(run_dir: Path, settings: Settings, new_devices: int) -> dict[str, Any]:
    """One finished, evaluated run: its epsilon report, diagnostics and per-new-device utilities
    (RuntimeError if it did not finish or was not evaluated)."""
    if not finished(run_dir, settings):
        raise RuntimeError(f"grid point {run_dir} did not finish its {settings.simulation.rounds} rounds "
                           f"({len(_rounds(run_dir))} recorded; e.g. Ray failed to start): run the sweep again to "
                           "redo the unfinished points")
    if not evaluated(run_dir, settings, new_devices):
        raise RuntimeError(f"grid point {run_dir}: its released adapter was not evaluated on the new devices "
                           f"({EVAL_FILE} missing or for other devices): run the sweep again")
    rounds = _rounds(run_dir)
    f = settings.federated
    privacy_file = run_dir / "privacy.json"
    privacy = json.loads(privacy_file.read_text()) if privacy_file.is_file() else None
    snrs = [r["snr"] for r in rounds if "snr" in r and math.isfinite(r["snr"])]
    return {
        "noise_multiplier": f.noise_multiplier if f.dp else NO_NOISE,
        "epsilon": privacy["epsilon"] if privacy else math.inf,
        "delta": f.delta,
        "sampling": "poisson",
        "sample_rate": privacy["sample_rate"] if privacy else math.nan,
        "neighbouring": f.neighbouring,
        "accountant": privacy["accountant"] if privacy else "none (no noise)",
        "rounds": len(rounds),
        "regime": regime(settings),
        "snr_mean": sum(snrs) / len(snrs) if snrs else math.inf,
        "contributors_mean": sum(r.get("contributors", 0) for r in rounds) / max(len(rounds), 1),
        "failed_device_rounds": sum(r.get("failed", 0) for r in rounds),
        "report": privacy["report"] if privacy else "no user-level DP (epsilon infinite)",
        "run_dir": str(run_dir),
        "devices": json.loads((run_dir / EVAL_FILE).read_text())["devices"],
    }


def regime(settings: Settings) -> str:
    """Whose noise and sampling rate the epsilon is: the simulated cohort's or a production cohort's."""
    f, sim = settings.federated, settings.simulation
    if not f.dp:
        return "no noise (reference)"
    if f.noise_cohort_size:
        return (f"production regime: noise and epsilon of a cohort of {f.noise_cohort_size} devices a round of "
                f"{f.noise_population_size} (q = {f.noise_cohort_size / f.noise_population_size:.3g}); the simulation "
                f"trained about {sim.cohort_size} a round of {settings.population.num_devices}")
    return (f"simulated: noise and epsilon of the simulated cohort (about {sim.cohort_size} devices a round of "
            f"{settings.population.num_devices})")


# ------------------------------------------------------------------ aggregation


def bootstrap_mean_ci(table: np.ndarray, confidence: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of a draws x devices table (NaN = missing) with a percentile bootstrap CI that resamples
    the draws and, independently, the devices: (mean, low, high). One draw: over devices only."""
    table = np.atleast_2d(np.asarray(table, dtype=np.float64))
    if not np.isfinite(table).any():
        return math.nan, math.nan, math.nan
    mean = float(np.nanmean(table))
    draws, devices = table.shape
    if draws * devices == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, draws, size=draws)
        cols = rng.integers(0, devices, size=devices)
        sample = table[np.ix_(rows, cols)]
        means[b] = np.nanmean(sample) if np.isfinite(sample).any() else np.nan
    means = means[np.isfinite(means)]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def _table(points: Sequence[dict[str, Any]], ids: list[int], value) -> np.ndarray:
    """draws x devices of value(device row, device id) (NaN where missing)."""
    out = np.full((len(points), len(ids)), np.nan)
    for i, p in enumerate(points):
        by_id = {r["device_id"]: r for r in p["devices"]}
        for j, d in enumerate(ids):
            if d in by_id:
                v = value(by_id[d], d)
                out[i, j] = np.nan if v is None else float(v)
    return out


def summarize(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per noise level (the reference first) from the point results (point_result dicts)."""
    ref = [p for p in points if p["noise_multiplier"] == NO_NOISE]
    ref_by_id = {r["device_id"]: r for r in ref[0]["devices"]} if ref else {}
    levels: dict[Any, list[dict[str, Any]]] = {}
    for p in points:
        levels.setdefault(p["noise_multiplier"], []).append(p)
    order = sorted(levels, key=lambda z: -1.0 if z == NO_NOISE else float(z))
    rows = []
    for z in order:
        draws = levels[z]
        ids = sorted({r["device_id"] for p in draws for r in p["devices"]})

        def vs_ref(key: str):
            return lambda r, d: (r[key] - ref_by_id[d][key]) if d in ref_by_id else None

        values = {
            "cold_rouge1": lambda r, d: r["global_rouge1"],
            "cold_uplift": lambda r, d: r["global_rouge1"] - r["base_rouge1"],
            "cold_vs_reference": vs_ref("global_rouge1"),
            "finetuned_rouge1": lambda r, d: r["finetuned_rouge1"],
            "finetuned_uplift": lambda r, d: r["finetuned_rouge1"] - r["base_rouge1"],
            "finetuned_vs_reference": vs_ref("finetuned_rouge1"),
        }
        tables = {m: _table(draws, ids, fn) for m, fn in values.items()}
        epsilons = [p["epsilon"] for p in draws]
        first = draws[0]
        row: dict[str, Any] = {
            "noise_multiplier": z, "draws": len(draws), "epsilon": max(epsilons),
            "delta": first["delta"], "sampling": first["sampling"], "sample_rate": first["sample_rate"],
            "neighbouring": first["neighbouring"], "accountant": first["accountant"],
            "rounds": min(p["rounds"] for p in draws), "regime": first["regime"], "new_devices": len(ids),
            "finetuned_devices": int(np.isfinite(tables["finetuned_rouge1"]).all(axis=0).sum()),
            "base_rouge1": float(np.nanmean(_table(draws, ids, lambda r, d: r["base_rouge1"]))),
        }
        for m, _ in METRICS:
            row[m], row[f"{m}_low"], row[f"{m}_high"] = bootstrap_mean_ci(tables[m])
        per_draw = {m: [float(np.nanmean(t[i])) if np.isfinite(t[i]).any() else math.nan for i in range(len(draws))]
                    for m, t in tables.items()}
        for m in ("cold_uplift", "finetuned_rouge1"):
            finite = [v for v in per_draw[m] if math.isfinite(v)]
            row[f"{m}_draw_sd"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        row |= {
            "snr_mean": float(np.mean([p["snr_mean"] for p in draws])),
            "contributors_mean": float(np.mean([p["contributors_mean"] for p in draws])),
            "failed_device_rounds": int(sum(p["failed_device_rounds"] for p in draws)),
            "per_draw_means": per_draw,
            "epsilons": epsilons,
            "reports": [p["report"] for p in draws],
            "run_dirs": [p["run_dir"] for p in draws],
        }
        rows.append(row)
    return rows


# ------------------------------------------------------------------ the sweep


def sweep_privacy(base: Settings, noises: list[float], out_dir: Path, jobs: int = 1,
                  include_no_noise: bool = True, progress: bool = True, *, draws: int = 3,
                  new_devices: int = 8) -> list[dict[str, Any]]:
    """Run every grid point (each noise level `draws` times, the reference once), evaluate each
    released adapter on `new_devices` new devices, write the table, JSON and plots; returns the
    summary rows (one per noise level, the reference first)."""
    if not noises and not include_no_noise:
        raise ValueError("sweep privacy: give at least one noise multiplier (--noise 0.5 1 2)")
    if any(not (z > 0 and math.isfinite(z)) for z in noises):
        raise ValueError(f"sweep privacy: noise multipliers must be finite numbers > 0, got {noises}")
    if jobs < 1:
        raise ValueError(f"sweep privacy: --jobs must be >= 1, got {jobs}")
    if draws < 1:
        raise ValueError(f"sweep privacy: --draws must be >= 1, got {draws}")
    if new_devices < 1:
        raise ValueError(f"sweep privacy: --new-devices must be >= 1, got {new_devices}")
    if base.federated.noise_seed is not None:
        raise ValueError("sweep privacy: federated.noise_seed is set, so every draw would add the same noise; unset it "
                         "(each run then draws its noise from its own secret randomness)")
    if base.federated.calibrate_epsilon:
        raise ValueError("sweep privacy: federated.calibrate_epsilon would replace the grid's noise multipliers; set "
                         "it to 0")
    if base.population.source != "synthetic":
        raise ValueError(f"sweep privacy: the released adapter is evaluated on new devices above the training "
                         f"population's ids, which only the synthetic population generates (population.source = "
                         f"'{base.population.source}')")
    out_dir.mkdir(parents=True, exist_ok=True)
    points = ([Point(None)] if include_no_noise else []) + [Point(z, d) for z in noises for d in range(draws)]
    tasks, results_done = [], {}
    for i, point in enumerate(points):
        settings, run_dir = point_settings(base, point.noise), out_dir / "runs" / point.name
        reusable = run_dir.is_dir() and finished(run_dir, settings) and (run_dir / "config.toml").is_file()
        if reusable and evaluated(run_dir, settings, new_devices):
            results_done[i] = point_result(run_dir, settings, new_devices)
            continue
        if not reusable:
            shutil.rmtree(run_dir, ignore_errors=True)
        tasks.append((i, settings.model_dump_json(), str(run_dir), not reusable))
    from tqdm import tqdm

    bar = tqdm(total=len(points), initial=len(results_done), desc="privacy sweep", unit="point",
               disable=not progress)
    results: list[dict[str, Any] | None] = [results_done.get(i) for i in range(len(points))]
    failures = []
    if tasks and jobs == 1:  # one process, one Ray start for every point (its worker slots reused)
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                outcomes = pool.submit(_run_points_one_session, [t[1:] for t in tasks], new_devices).result()
            except RuntimeError as err:  # e.g. the simulation itself failed: no point is lost but this session's
                outcomes = [str(err)] * len(tasks)
        for (i, *_), outcome in zip(tasks, outcomes):
            if isinstance(outcome, str):
                failures.append(outcome)
            else:
                results[i] = outcome
            bar.update(1)
    elif tasks:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_point, settings_json, run_dir, new_devices, train): i
                       for i, settings_json, run_dir, train in tasks}
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except (RuntimeError, FileNotFoundError) as err:  # one point failing never loses the others
                    failures.append(str(err))
                bar.update(1)
    bar.close()
    if failures:
        raise RuntimeError("; ".join(failures))
    rows = summarize([r for r in results if r is not None])
    write_outputs(rows, out_dir)
    return rows


def write_outputs(rows: list[dict[str, Any]], out_dir: Path) -> None:
    with (out_dir / "privacy_sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "privacy_sweep.json").write_text(json.dumps(
        {"ci_method": CI_METHOD, "metrics": dict(METRICS), "rows": rows}, indent=2, allow_nan=True))
    plot(rows, out_dir)


def _label(rows: list[dict[str, Any]]) -> str:
    dp = [r for r in rows if r["noise_multiplier"] != NO_NOISE]
    if not dp:
        return ""
    r = dp[0]
    acc = "PLD" if "PLD" in r["accountant"] else ("RDP" if "RDP" in r["accountant"] else r["accountant"])
    return (f"user-level epsilon (delta {r['delta']:g}, Poisson q = {r['sample_rate']:.3g}, {r['neighbouring']}, "
            f"{acc}, {r['rounds']} rounds)")


def plot(rows: list[dict[str, Any]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    dp = [r for r in rows if r["noise_multiplier"] != NO_NOISE]
    ref = [r for r in rows if r["noise_multiplier"] == NO_NOISE]
    panels = (("cold_uplift", "cold start: released adapter alone\nROUGE-1 uplift over base"),
              ("finetuned_rouge1", "fine-tuned from the released adapter\nheld-out ROUGE-1"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (m, title) in zip(axes, panels):
        if dp:
            xs = [r["epsilon"] for r in dp]
            ys = [r[m] for r in dp]
            err = [[r[m] - r[f"{m}_low"] for r in dp], [r[f"{m}_high"] - r[m] for r in dp]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4,
                        label=f"DP-FedAvg, {dp[0]['draws']} draws (95% CI over draws and devices)")
            for r in dp:
                ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r[m]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
            if all(x > 0 for x in xs):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap over a short range
        for r in ref:
            ax.axhspan(r[f"{m}_low"], r[f"{m}_high"], alpha=0.15, color="grey")
            ax.axhline(r[m], color="grey", linestyle="--", label="no noise (95% CI over devices)")
        if m == "cold_uplift":
            ax.axhline(0.0, color="black", linewidth=0.6)
        elif rows:
            ax.axhline(rows[0]["base_rouge1"], color="black", linestyle=":", linewidth=0.8, label="base model")
        ax.set_xlabel(_label(rows) or "epsilon", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    n = rows[0]["new_devices"] if rows else 0
    regime_text = dp[0]["regime"] if dp else ""
    fig.suptitle(f"Utility of the DP-released global adapter on {n} new devices\n{regime_text}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "epsilon_vs_utility.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if dp:
        ax.plot([r["noise_multiplier"] for r in dp], [r["snr_mean"] for r in dp], "o-")
        ax.set_yscale("log")
    ax.set_xlabel("noise multiplier z")
    ax.set_ylabel("mean SNR of the noised sum")
    ax.set_title("||clipped sum|| / E||noise|| (diagnostic, not covered by epsilon)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "snr_by_noise.png", dpi=120)
    plt.close(fig)
