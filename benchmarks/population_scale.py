"""Per-round time and peak memory of `fedasls simulate` as the population grows, same cohort.

Each population runs in its own `fedasls simulate` process; peak memory is the largest summed
RSS of that process and all its descendants (Ray workers included), sampled every 0.2 s.
Targets: 100k vs 1k within 1.25x per-round time and 1.5x peak memory.

    python benchmarks/population_scale.py --populations 1000 10000 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--populations", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--cohort", type=int, default=20, help="cohort size K (default 20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="results/population_scale", help="folder for the runs and the CSV")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p.parse_args()


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(n: int, args: argparse.Namespace) -> dict:
    out = Path(args.out)
    name = f"pop-{n}"
    cmd = [
        sys.executable, "-m", "simulations.cli", "simulate", "--name", name,
        "--set", f"population.num_devices={n}",
        "--set", f"simulation.cohort_size={args.cohort}",
        "--set", f"simulation.rounds={args.rounds}",
        "--set", f'simulation.output_dir="{out}"',
        *[x for o in args.overrides for x in ("--set", o)],
    ]
    run_dir = out / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"population {n} failed:\n{proc.stderr.read()[-3000:]}")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    steady = rounds[1:] or rounds  # round 1 includes loading the model into each Ray worker
    return {
        "population": n,
        "cohort": args.cohort,
        "rounds": len(rounds),
        "round_s_mean": sum(r["wall_s"] for r in rounds) / len(rounds),
        "round_s_steady": sum(r["wall_s"] for r in steady) / len(steady),
        "device_rounds": sum(r["completed"] + r["stragglers"] for r in rounds),
        "peak_rss_mb": peak / 2**20,
        "wall_s": wall,
    }


def main() -> None:
    args = parse_args()
    rows = [run_one(n, args) for n in args.populations]
    print(f"\n{'population':>11}{'round s (all)':>15}{'round s (2..)':>15}{'peak RSS MB':>13}{'wall s':>9}")
    for r in rows:
        print(f"{r['population']:>11,}{r['round_s_mean']:>15.2f}{r['round_s_steady']:>15.2f}"
              f"{r['peak_rss_mb']:>13.0f}{r['wall_s']:>9.1f}")
    first, last = rows[0], rows[-1]
    print(f"\n{last['population']:,} vs {first['population']:,}: per-round time x"
          f"{last['round_s_steady'] / first['round_s_steady']:.2f} (target <= 1.25), peak memory x"
          f"{last['peak_rss_mb'] / first['peak_rss_mb']:.2f} (target <= 1.5)")
    out = Path(args.out) / "population_scale.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
