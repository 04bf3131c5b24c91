"""How fedasls's lead over the naive client grows with a device's history, from throughput.py runs.

Reads throughput.py summaries (JSON: `--out` folders' throughput.json or the committed
`benchmarks/baselines/throughput-*.json`) made at different stream lengths, and puts each variant's
CPU seconds per device round and held-out ROUGE-1 (95% CI over devices) against the length of the
devices' streams (interactions per device). A naive client retrains on all of a device's history
each round, a fedasls device on its bounded buffer, so their ratio is a function of that length.

    python benchmarks/throughput_history.py                      # the committed embedded-model runs
    python benchmarks/throughput_history.py run1/throughput.json run2/throughput.json --out DIR

Outputs under --out: throughput_history.csv (one row per run and variant), throughput_history.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import BASELINES, REPO

DEFAULT_RUNS = ("throughput-today.json", "throughput-long-history-480-day10.json",
                "throughput-long-history-960-day20.json")
VARIANT_STYLE = {"fedasls": ("C0", "o"), "naive": ("C3", "s"), "bare": ("C2", "^")}
FIELDS = ["run", "stream_length", "start_day", "model", "variant", "device_rounds", "cpu_s_per_device_round",
          "rate", "steady_rate", "rouge1_mean", "rouge1_ci_low", "rouge1_ci_high", "naive_over_fedasls_cpu"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="throughput.py summaries (JSON); default: the committed embedded-model "
                   f"runs in benchmarks/baselines/ ({', '.join(DEFAULT_RUNS)})")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "throughput_history"), help="output folder")
    return p.parse_args(argv)


def _scenario(summary: dict[str, Any], source: Path) -> Any:
    """The run's settings (its scenario file, found again in fedasls/scenarios/ if the run was made elsewhere)."""
    from fedasls.config import load_settings

    config = Path(summary["config"])
    if not config.is_file():
        config = REPO / "fedasls" / "scenarios" / config.name
    if not config.is_file():
        raise SystemExit(f"{source}: its scenario {summary['config']} is not here and not in fedasls/scenarios/; "
                         "rerun throughput.py with a scenario that exists")
    return load_settings(config, list(summary.get("overrides", [])))


def rows_of(path: Path) -> list[dict[str, Any]]:
    """One row per variant of one throughput.py summary."""
    try:
        summary = json.loads(path.read_text())
        variants = summary["variants"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"{path}: not a throughput.py summary ({type(err).__name__}: {err}); pass the "
                         "throughput.json of a `python benchmarks/throughput.py --out DIR` run") from None
    settings = _scenario(summary, path)
    model = settings.model.preset or settings.model.path or "embedded"
    ratio = summary.get("ratios", {}).get("a/n_cpu", float("nan"))  # throughput.py's own naive/fedasls CPU ratio
    rows = []
    for name, v in variants.items():
        low, high = v.get("rouge1_ci", (float("nan"), float("nan")))
        rows.append({
            "run": path.name, "stream_length": settings.population.stream_length, "start_day": summary["start_day"],
            "model": model, "variant": name, "device_rounds": v["device_rounds"],
            "cpu_s_per_device_round": v["cpu_s_per_device_round"], "rate": v["rate"], "steady_rate": v["steady_rate"],
            "rouge1_mean": v["rouge1_mean"], "rouge1_ci_low": low, "rouge1_ci_high": high,
            "naive_over_fedasls_cpu": ratio,
        })
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Left: CPU s per device round (log) with naive/fedasls written above; right: ROUGE-1 with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost, quality) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = sorted({r["model"] for r in rows})
    for (model, variant) in sorted({(r["model"], r["variant"]) for r in rows}):
        mine = sorted((r for r in rows if (r["model"], r["variant"]) == (model, variant)), key=lambda r: r["stream_length"])
        color, marker = VARIANT_STYLE.get(variant, ("C7", "x"))
        style = dict(marker=marker, color=color, linestyle=("-", "--", ":", "-.")[models.index(model) % 4],
                     label=variant if len(models) == 1 else f"{model}: {variant}")
        x = [r["stream_length"] for r in mine]
        cost.plot(x, [r["cpu_s_per_device_round"] for r in mine], **style)
        means = [r["rouge1_mean"] for r in mine]
        errors = [[m - r["rouge1_ci_low"] for m, r in zip(means, mine)], [r["rouge1_ci_high"] - m for m, r in zip(means, mine)]]
        quality.errorbar(x, means, yerr=errors, capsize=3, **style)
    for r in rows:
        if r["variant"] == "naive" and r["naive_over_fedasls_cpu"] == r["naive_over_fedasls_cpu"]:
            cost.annotate(f"x{r['naive_over_fedasls_cpu']:.1f}", (r["stream_length"], r["cpu_s_per_device_round"]),
                          textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    cost.set_yscale("log")
    cost.set_title("CPU s per device round (naive / fedasls above)")
    quality.set_title("held-out ROUGE-1, last round (95% CI over devices)")
    for ax in (cost, quality):
        ax.set_xlabel("interactions per device stream")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    paths = [Path(p) for p in args.runs] or [BASELINES / name for name in DEFAULT_RUNS]
    rows = [row for path in paths for row in rows_of(path)]
    out = Path(args.out)
    write_csv(out / "throughput_history.csv", rows)
    plot(out / "throughput_history.png", rows)
    print(f"{'stream':>6}  {'from day':>8}  {'variant':<8} {'CPU s/dr':>9}  {'ROUGE-1 [95% CI]':<24} naive/fedasls CPU")
    for r in sorted(rows, key=lambda r: (r["stream_length"], r["variant"])):
        ci = f"{r['rouge1_mean']:.3f} [{r['rouge1_ci_low']:.3f}, {r['rouge1_ci_high']:.3f}]"
        print(f"{r['stream_length']:>6}  {r['start_day']:>8g}  {r['variant']:<8} {r['cpu_s_per_device_round']:>9.2f}  "
              f"{ci:<24} x{r['naive_over_fedasls_cpu']:.2f}")
    print(f"written: {out / 'throughput_history.csv'}, {out / 'throughput_history.png'}")
    return rows


if __name__ == "__main__":
    main()
