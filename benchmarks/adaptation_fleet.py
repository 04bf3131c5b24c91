"""The quickstart fleet in-process (no Flower, no Ray): fast loop for tuning the adaptation step.

It samples the same cohorts as `fedasls simulate` (the seeded coordinator, dropouts and the
virtual clock; with one round a day the clock advances by exactly `round_interval_s`, so the
cohorts do not depend on device durations), runs each sampled device's rounds in order with
`run_device_round`, and summarizes each device's last completed round like the fleet report:
ROUGE-1 uplift and accept rates with 95% bootstrap CIs over devices, plus the adaptation gate's
accept/reject counts and per-tier figures.

    python -m benchmarks.adaptation_fleet                           # quickstart defaults
    python -m benchmarks.adaptation_fleet --set adaptation.learning_rate=3e-3 --out results/lr3e-3.csv
    python -m benchmarks.adaptation_fleet --set ... --baseline results/adaptation_fleet.csv   # paired vs a run

With `--baseline CSV` (a per-device CSV of an earlier run on the same scenario), it also prints the
paired difference of ROUGE-1 uplift over the devices both runs completed (95% CI) and the training
and device CPU seconds of both runs.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.measure import add_run_arguments, load_run_settings, parser, write_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_run_arguments(p, out="results/adaptation_fleet.csv")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--baseline", metavar="CSV", help="an earlier run's per-device CSV: print the paired difference")
    args = p.parse_args(argv)
    if args.baseline and not Path(args.baseline).is_file():
        p.error(f"--baseline {args.baseline}: no such file; pass the --out CSV of an earlier run")
    if args.baseline and Path(args.baseline).resolve() == Path(args.out).resolve():
        p.error(f"--baseline and --out are the same file ({args.out}); write this run elsewhere with --out")
    return args


def read_rows(path: Path) -> list[dict]:
    """Device rows of a CSV written by this benchmark, numbers parsed back."""
    import csv

    def value(text: str):
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def paired_difference(rows: list[dict], baseline_rows: list[dict]) -> dict:
    """This run minus the baseline: per-device ROUGE-1 uplift (last completed round) on the devices
    both completed, with a 95% CI; and both runs' training and device CPU seconds."""
    from fedasls.stats import mean_ci
    from simulations.report import last_participation

    ours = {r["device_id"]: r for r in last_participation(rows)}
    theirs = {r["device_id"]: r for r in last_participation(baseline_rows)}
    common = sorted(set(ours) & set(theirs))
    if not common:
        raise ValueError("the baseline CSV shares no completed device with this run: is it the same scenario?")
    diff = [(ours[d]["rouge1"] - ours[d]["base_rouge1"]) - (theirs[d]["rouge1"] - theirs[d]["base_rouge1"])
            for d in common]

    def total(key: str, table: list[dict]) -> float:
        return sum(float(r.get(key) or 0.0) for r in table)

    return {"devices": len(common), "uplift_difference": mean_ci(diff),
            "train_cpu_s": (total("stage_train_cpu_s", rows), total("stage_train_cpu_s", baseline_rows)),
            "device_cpu_s": (total("cpu_s", rows), total("cpu_s", baseline_rows))}


def cohorts(settings) -> list[tuple[int, float, list[int]]]:
    """(round, now, devices that run) per round, as the fleet loop samples them."""
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from server.coordinator import Coordinator

    s, sim = settings, settings.simulation
    hetero = HeterogeneityModel.from_settings(s.heterogeneity)
    coordinator = Coordinator(population_size=s.population.num_devices, heterogeneity=hetero,
                              cohort_size=sim.cohort_size, overcommit=sim.overcommit,
                              deadline_s=sim.deadline_s or None, seed=s.heterogeneity.seed)
    coordinator.clock.now = sim.start_time_s
    out = []
    for server_round in range(1, sim.rounds + 1):
        now = coordinator.clock.now
        sampled = coordinator.sample(now)
        dropouts = coordinator.draw_dropouts(sampled)
        out.append((server_round, now, [d for d in sampled if d not in dropouts]))
        coordinator.close_round(now, {}, set(sampled))
        coordinator.clock.now = max(coordinator.clock.now, now + sim.round_interval_s)
    return out


_WORKER = None


def run_device(job: tuple[str, int, list[tuple[int, float]], str]) -> list[dict]:
    """All rounds of one device, in order, in a worker process with its own runtime."""
    settings_json, device_id, rounds, store_dir = job
    global _WORKER
    import torch

    torch.set_num_threads(1)
    from fedasls.config import Settings
    from fedasls.device.round import run_device_round
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from fedasls.device.worker import DeviceRuntime
    from fedasls.sim.cost_model import CostModel
    from fedasls.sim.simulated_timing import SimulatedTiming
    from fedasls.device.store import DeviceStore

    settings = Settings.model_validate_json(settings_json)
    if _WORKER is None:
        _WORKER = (DeviceRuntime(settings), HeterogeneityModel.from_settings(settings.heterogeneity))
    runtime, hetero = _WORKER
    store = DeviceStore(store_dir)
    rows: list[dict] = []
    seen_history = 0
    for server_round, now in rounds:
        t0 = time.process_time()
        keep = SimulatedTiming(hetero, CostModel(settings.cost)).keep_if_online(device_id, now)  # as the fleet's slots do
        result = run_device_round(device_id, now, runtime, settings, store, hetero, keep=keep)
        row = {"round": server_round, "now": now, "tier": hetero.profile(device_id).tier,
               "cpu_s": time.process_time() - t0, **result.metrics()}
        state = store.load(device_id)
        persona = runtime.population.persona(device_id)
        row["cursor"] = state["cursor"] if state else math.nan
        row["drift_at"] = persona.drift_at if persona.drift_at is not None else -1
        # the gate's view of this round's adaptation next to the truth (held-out ROUGE-1 before / after)
        history = state["counters"]["history"] if state else []
        last = history[-1] if len(history) > seen_history else {}
        seen_history = len(history) if state else seen_history
        for key in ("status", "heldback", "epochs", "attempts", "examples", "annotated", "kept_heldback_loss",
                    "new_heldback_loss", "kept_heldback_rouge1", "new_heldback_rouge1", "scale"):
            row[f"adapt_{key}"] = last.get(key, "")
        previous = [r for r in rows if r["status_code"] == 0]
        row["prev_rouge1"] = previous[-1]["rouge1"] if previous else result.base_rouge1
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the fleet, print the summary; returns each device's last completed round."""
    args = parse_args(argv)
    from fedasls.stats import mean_ci
    from simulations.report import last_participation

    settings = load_run_settings(args)
    plan: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for server_round, now, devices in cohorts(settings):
        for d in devices:
            plan[d].append((server_round, now))
    t0, cpu0 = time.perf_counter(), time.process_time()
    rows: list[dict] = []
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as store_dir, ProcessPoolExecutor(max_workers=args.jobs) as pool:
        jobs = [(settings.model_dump_json(), d, rs, store_dir) for d, rs in sorted(plan.items())]
        for device_rows in tqdm(pool.map(run_device, jobs), total=len(jobs), desc="devices", unit="dev"):
            rows += device_rows
    wall = time.perf_counter() - t0
    devices = last_participation(rows)
    out = write_rows(args.out, rows)

    def ci(values: list[float]) -> str:
        kept = [v for v in values if not math.isnan(v)]
        if not kept:
            return "n/a"
        m, lo, hi = mean_ci(kept)
        return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    uplift = [r["rouge1"] - r["base_rouge1"] for r in devices]
    print(f"\n{len(devices)} devices, {len(rows)} device-rounds, {wall:.0f} s wall, "
          f"{sum(r['cpu_s'] for r in rows):.0f} s device CPU; overrides: {args.overrides or 'none'}")
    print(f"ROUGE-1 uplift          {ci(uplift)}")
    print(f"ROUGE-1 personal / base {ci([r['rouge1'] for r in devices])} / {ci([r['base_rouge1'] for r in devices])}")
    print(f"accept rate personal    {ci([r['accept_rate'] for r in devices])}")
    print(f"accept rate base        {ci([r['base_accept_rate'] for r in devices])}")
    better = sum(u > 1e-9 for u in uplift)
    worse = sum(u < -1e-9 for u in uplift)
    print(f"devices better / same / worse: {better} / {len(uplift) - better - worse} / {worse}")
    if devices and "gate_accepted" in devices[0]:
        print(f"gate: accepted {sum(r['gate_accepted'] for r in devices)}, rejected "
              f"{sum(r['gate_rejected'] for r in devices)}, waiting (too few items) "
              f"{sum(r.get('gate_waiting', 0) for r in devices)} (over the devices' lifetimes)")
    for tier in ("low", "mid", "high"):
        t = [r["rouge1"] - r["base_rouge1"] for r in devices if r["tier"] == tier]
        if t:
            print(f"  tier {tier:<4} n={len(t):>2} uplift {ci(t)}")
    if args.baseline:
        d = paired_difference(rows, read_rows(Path(args.baseline)))
        m, lo, hi = d["uplift_difference"]
        print(f"paired vs {args.baseline} ({d['devices']} devices): uplift difference {m:+.4f} [{lo:+.4f}, {hi:+.4f}]; "
              f"training CPU s {d['train_cpu_s'][0]:.1f} vs {d['train_cpu_s'][1]:.1f}, "
              f"device CPU s {d['device_cpu_s'][0]:.1f} vs {d['device_cpu_s'][1]:.1f}")
    print(f"CSV: {out}")
    return devices


if __name__ == "__main__":
    main()
