"""Startup, per-round time and peak memory of `fedasls simulate` as the population grows, same cohort.

Each population runs in its own `fedasls simulate` process; peak memory is the largest summed
RSS of that process and all its descendants (Ray workers included), sampled every 0.2 s; CPU
seconds of that tree and the load average stand next to the wall times. Startup is the run's
wall time outside its rounds (imports, Ray, SuperNodes, the first model loads, teardown).
Where a round's time goes is read from the replies' per-stage seconds (fedasls.device.timing): the
device-round stages summed over devices and divided by the workers, against the round's wall time
(the rest is Flower/Ray dispatch and the server loop).
Targets: 100k vs 1k within 1.25x per-round time and 1.5x peak memory.

    python -m benchmarks.population_scale                     # 1k, 100k, 1M devices
    python -m benchmarks.population_scale --quick             # 1k and 1M, toy work per device
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.measure import (BASELINES, REPO, RESULTS, TreeCPU, add_run_arguments, command_line, config_path,
                                load_avg, machine, parser, run_overrides, write_json)

QUICK = ["population.stream_length=40", "adaptation.epochs=1", "evaluation.max_new_tokens=8",
         "synthesis.method=\"fallback\"", "synthesis.rewrites=1"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_run_arguments(p, out=str(RESULTS / "population_scale"))
    p.add_argument("--populations", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    p.add_argument("--cohort", type=int, default=20, help="cohort size K (default 20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="populations 1k and 1M, cohort 4, 2 rounds, toy work per device (a few minutes on a busy machine)")
    p.add_argument("--save-baseline", metavar="NAME", help="also write benchmarks/baselines/population_scale-NAME.json")
    args = p.parse_args(argv)
    if args.quick:
        args.populations = [1000, 1_000_000] if args.populations == p.get_default("populations") else args.populations
        args.cohort, args.rounds = 4, 2
        args.overrides = QUICK + args.overrides
    return args


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(n: int, args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    name = f"pop-{n}"
    cmd = [
        sys.executable, "-m", "simulations.cli", "simulate", "--name", name, "--config", str(config_path(args.config)),
        "--set", f"population.num_devices={n}",
        "--set", f"simulation.cohort_size={args.cohort}",
        "--set", f"simulation.rounds={args.rounds}",
        "--set", f'simulation.output_dir="{out}"',
        *[x for o in run_overrides(args) for x in ("--set", o)],
    ]
    run_dir = out / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    load0, t0 = load_avg(), time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    ps = psutil.Process(proc.pid)
    peak = 0
    with TreeCPU(proc.pid) as tree:
        while proc.poll() is None:
            peak = max(peak, tree_rss(ps))
            time.sleep(0.2)
        stderr = proc.stderr.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"population {n} failed:\n{stderr[-3000:]}")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    devices = [json.loads(line) for line in (run_dir / "device_rounds.jsonl").read_text().splitlines()]
    steady = rounds[1:] or rounds  # round 1 includes loading the model into each Ray worker
    return {
        "population": n,
        "cohort": args.cohort,
        "rounds": len(rounds),
        "round_s_mean": sum(r["wall_s"] for r in rounds) / len(rounds),
        "round_s_steady": sum(r["wall_s"] for r in steady) / len(steady),
        "startup_s": wall - sum(r["wall_s"] for r in rounds),
        "device_rounds": sum(r["completed"] + r["stragglers"] for r in rounds),
        "peak_rss_mb": peak / 2**20,
        "wall_s": wall,
        "cpu_s": tree.seconds,
        "load_before": load0,
        "load_after": load_avg(),
        "where_time_goes": where_time_goes(rounds, devices, workers(args)),
    }


def workers(args: argparse.Namespace) -> int:
    from fedasls.config import load_settings

    return load_settings(config_path(args.config), run_overrides(args)).simulation.workers


def where_time_goes(rounds: list[dict], devices: list[dict], n_workers: int) -> dict[str, float]:
    """Round wall seconds (rounds 2.. when there are several) split into device-round stages (their wall
    seconds summed over devices / workers) and the rest (Flower + Ray dispatch, server loop, idle workers)."""
    keep = {r["round"] for r in (rounds[1:] or rounds)}
    wall = sum(r["wall_s"] for r in rounds if r["round"] in keep)
    stages: dict[str, float] = {}
    for row in devices:
        if row["round"] not in keep:
            continue
        for key, value in row.items():
            if key.startswith("stage_") and key.endswith("_s") and not key.endswith("_cpu_s"):
                name = key[len("stage_"):-len("_s")]
                stages[name] = stages.get(name, 0.0) + value / n_workers
    out = {name: seconds / wall for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1])}
    out["flower_ray_server_rest"] = max(0.0, 1.0 - sum(out.values()))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for n in args.populations:
        print(f"population {n:,} ...", flush=True)
        rows.append(run_one(n, args))
    print(f"\ncohort {args.cohort}, {args.rounds} rounds {' '.join(args.overrides)}")
    print(f"{'population':>11}{'startup s':>11}{'round s (all)':>15}{'round s (2..)':>15}{'peak RSS MB':>13}"
          f"{'wall s':>9}{'CPU s':>8}{'load':>12}")
    for r in rows:
        print(f"{r['population']:>11,}{r['startup_s']:>11.1f}{r['round_s_mean']:>15.2f}{r['round_s_steady']:>15.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['wall_s']:>9.1f}{r['cpu_s']:>8.1f}{r['load_before']:>6.1f}->{r['load_after']:<5.1f}")
    first, last = rows[0], rows[-1]
    print(f"\n{last['population']:,} vs {first['population']:,}: per-round time x"
          f"{last['round_s_steady'] / first['round_s_steady']:.2f} (target <= 1.25), peak memory x"
          f"{last['peak_rss_mb'] / first['peak_rss_mb']:.2f} (target <= 1.5)")
    focus = next((r for r in rows if r["population"] == 100_000), last)
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in focus["where_time_goes"].items() if v >= 0.005)
    print(f"where a round's time goes at {focus['population']:,} devices: {shares}")
    summary = {"command": command_line("benchmarks.population_scale", argv),
               "machine": machine(), "rows": rows}
    print(f"written: {write_json(Path(args.out) / 'population_scale.json', summary)}")
    if args.save_baseline:
        print(f"baseline: {write_json(BASELINES / f'population_scale-{args.save_baseline}.json', summary)}")
    return rows


if __name__ == "__main__":
    main()
