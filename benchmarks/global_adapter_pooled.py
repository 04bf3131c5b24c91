"""Pool several `benchmarks/global_adapter.py` runs (e.g. population seeds): cold-start and trained devices.

Cold start, for every device of every run that never trained: the global adapter alone minus the
base model, held-out ROUGE-1, pooled and split by whether the device's user follows the fleet-wide
trend (population.trend_share); for runs with --adoption, also the model each cold device chose by
its user's feedback minus the base model, and the share that adopted. Trained devices (runs with all three strategies): FedSA
global+personal minus local and minus the global adapter alone, and the devices fine-tuned from the
FedAvg global adapter minus local. Each figure: mean with a bootstrap 95% CI over devices.

    python benchmarks/global_adapter_pooled.py benchmarks/baselines/global_adapter-trend-uniform-seed{3,4,5,6}.json
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
from fedasls.data.sources import population_from_settings
from fedasls.stats import mean_ci

STRATEGIES = ("local", "global", "global+personal")  # as benchmarks/global_adapter.py names them
COLD = ("all", "trend users", "other users")  # cold-start groups
ADOPTED = tuple(f"chosen by feedback - base, {group}" for group in COLD)  # runs with --adoption
# trained-device comparisons: label -> (strategy, model) minus (strategy, model)
TRAINED = {
    "global+personal - local": (("global+personal", "personal"), ("local", "personal")),
    "global+personal - global alone": (("global+personal", "personal"), ("global", "global_alone")),
    "global fine-tuned - local": (("global", "personal"), ("local", "personal")),
}


def _load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (write it with benchmarks/global_adapter.py --out)")
    summary = json.loads(path.read_text())
    if "global" not in summary.get("per_device", {}):
        raise SystemExit(f"{path}: no 'global' strategy results; run global_adapter.py with --strategies global")
    return summary


def cold_start_rows(summary: dict) -> list[tuple[bool, float, float | None, bool | None]]:
    """Per cold-start device of one run: (follows the trend?, global alone - base, the model chosen by
    the user's feedback - base, adopted?); the last two are None without --adoption."""
    config = re.search(r"--config (\S+)", summary["command"])
    settings = load_settings(config.group(1) if config else "fedasls/scenarios/quickstart.toml", summary["overrides"])
    population = population_from_settings(settings.population)
    g = summary["per_device"]["global"]
    adopted = g.get("adopted") or {}
    rows = []
    for d in sorted(set(g["global_alone"]) - set(g["personal"]), key=int):
        gain = g["global_alone"][d] - g["base"][d]
        adopt = adopted[d]["adopt"] if d in adopted else None
        chosen = None if adopt is None else (gain if adopt else 0.0)
        rows.append((bool(population.persona(int(d)).style.get("trend")), gain, chosen, adopt))
    return rows


def trained_rows(summary: dict) -> dict[str, list[float]]:
    """Each TRAINED comparison's per-device differences ({} unless the run has all three strategies)."""
    per = summary["per_device"]
    if not all(s in per for s in STRATEGIES):
        return {}
    devices = sorted(set.intersection(*(set(per[s]["personal"]) for s in STRATEGIES)), key=int)
    return {label: [per[a][am][d] - per[b][bm][d] for d in devices] for label, ((a, am), (b, bm)) in TRAINED.items()}


def line(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label:40s} (no devices)"
    m, lo, hi = mean_ci(values)
    return f"  {label:40s} {m:+.4f} [{lo:+.4f}, {hi:+.4f}] (n={len(values)})"


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Print per-run and pooled figures; returns the pooled per-device differences by label."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="JSON files written by benchmarks/global_adapter.py")
    args = p.parse_args(argv)
    summaries = [(path, _load(path)) for path in args.runs]
    pooled: dict[str, list[float]] = {k: [] for k in (*COLD, *ADOPTED, *TRAINED)}
    adopted: dict[str, list[bool]] = {group: [] for group in COLD}
    print("cold start, global adapter alone - base, held-out ROUGE-1 (95% CI over devices)")
    for path, summary in summaries:
        rows = cold_start_rows(summary)
        print(line(path.name, [gain for _, gain, _, _ in rows]))
        for group, label, keep in ((COLD[0], ADOPTED[0], lambda t: True), (COLD[1], ADOPTED[1], lambda t: t),
                                   (COLD[2], ADOPTED[2], lambda t: not t)):
            mine = [r for r in rows if keep(r[0])]
            pooled[group] += [gain for _, gain, _, _ in mine]
            pooled[label] += [chosen for _, _, chosen, _ in mine if chosen is not None]
            adopted[group] += [adopt for _, _, _, adopt in mine if adopt is not None]
        if any(chosen is not None for _, _, chosen, _ in rows):
            print(line(f"{path.name}, chosen by feedback", [c for _, _, c, _ in rows if c is not None]))
    for path, summary in summaries:
        rows = trained_rows(summary)
        if rows:
            print(f"trained devices, {path.name}")
        for label, values in rows.items():
            print(line(label, values))
            pooled[label] += values
    print("pooled")
    for label, values in pooled.items():
        print(line(("trained, " if label in TRAINED else "cold start, ") + label, values))
    for group, flags in adopted.items():
        if flags:
            print(f"  adopted the global adapter, {group:27s} {sum(flags)} of {len(flags)} ({sum(flags) / len(flags):.0%})")
    return pooled


if __name__ == "__main__":
    main()
