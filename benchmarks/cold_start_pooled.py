"""Pool the cold-start results of several `benchmarks/global_adapter.py` runs (e.g. population seeds).

For every cold-start device (never trained) of every run: the global adapter alone minus the base
model, held-out ROUGE-1. Prints the pooled mean with a bootstrap 95% CI over devices, per run, and
split by whether the device's user follows the fleet-wide trend (population.trend_share).

    python benchmarks/cold_start_pooled.py benchmarks/baselines/global_adapter-trend-uniform-seed{1,2}.json
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import argparse
import json
import re
from pathlib import Path

from fedasls.config import load_settings
from fedasls.population import population_from_settings
from fedasls.stats import mean_ci


def cold_start_rows(path: Path) -> list[tuple[bool, float]]:
    """(follows the trend?, global alone - base) per cold-start device of one run's JSON."""
    summary = json.loads(path.read_text())
    if "global" not in summary.get("per_device", {}):
        raise SystemExit(f"{path}: no 'global' strategy results; run global_adapter.py with --strategies global")
    config = re.search(r"--config (\S+)", summary["command"])
    settings = load_settings(config.group(1) if config else "simulations/quickstart.toml", summary["overrides"])
    population = population_from_settings(settings.population)
    g = summary["per_device"]["global"]
    cold = sorted(set(g["global_alone"]) - set(g["personal"]), key=int)
    return [(bool(population.persona(int(d)).style.get("trend")), g["global_alone"][d] - g["base"][d]) for d in cold]


def line(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label:40s} (no devices)"
    m, lo, hi = mean_ci(values)
    return f"  {label:40s} {m:+.4f} [{lo:+.4f}, {hi:+.4f}] (n={len(values)})"


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by benchmarks/global_adapter.py")
    args = p.parse_args(argv)
    pooled: dict[str, list[float]] = {"all": [], "trend users": [], "other users": []}
    print("cold start, global adapter alone - base, held-out ROUGE-1 (95% CI over devices)")
    for path in args.runs:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (write it with benchmarks/global_adapter.py --out)")
        rows = cold_start_rows(path)
        print(line(path.name, [v for _, v in rows]))
        pooled["all"] += [v for _, v in rows]
        pooled["trend users"] += [v for t, v in rows if t]
        pooled["other users"] += [v for t, v in rows if not t]
    print("pooled")
    for label, values in pooled.items():
        print(line(label, values))
    return pooled


if __name__ == "__main__":
    main()
