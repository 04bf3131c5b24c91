"""Turn a run folder's JSONL records into CSV tables, a summary (with 95% CIs) and PNG plots."""

from __future__ import annotations

import csv
import json
import math
import statistics
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedasls.errors import FedaslsError  # noqa: E402
from fedasls.stats import mean_ci  # noqa: E402
from server.checkpoint import DEVICE_ROUNDS_FILE, ROUNDS_FILE  # noqa: E402

PLOTS = ("uplift_distribution.png", "metrics_over_rounds.png", "virtual_time_per_round.png", "participation_by_tier.png")


class ReportError(FedaslsError):
    """A run folder's records cannot be read; the message names the file and line."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A records file's rows; a missing file or a line that is not a JSON object is a ReportError."""
    if not path.is_file():
        raise ReportError(f"{path} is missing, so {path.parent} is not a finished fedasls run folder. Fix: pass the "
                          "folder of a `fedasls simulate` or `flwr run .` run.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{number} is not a JSON object (the file is damaged). Fix: restore the run "
                              "folder, or resume the run (fedasls simulate --resume) to rewrite its records.")
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def last_participation(device_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each device's latest row that ran to completion (completed or straggler: it did personalize)."""
    latest: dict[int, dict[str, Any]] = {}
    for row in device_rows:
        if row.get("status_code") == 0:
            latest[row["device_id"]] = row
    return [latest[d] for d in sorted(latest)]


def summarize(run_dir: Path, wall_seconds: float) -> dict[str, Any]:
    """Summary figures of a run (means over devices with bootstrap 95% CIs)."""
    rounds = read_jsonl(run_dir / ROUNDS_FILE)
    device_rows = read_jsonl(run_dir / DEVICE_ROUNDS_FILE)
    devices = last_participation(device_rows)
    ok = [r for r in device_rows if r.get("status_code") == 0]

    def ci(values: list[float]) -> list[float]:
        kept = [v for v in values if not math.isnan(v)]
        return list(mean_ci(kept)) if kept else [math.nan] * 3

    return {
        "devices_participated": len(devices),
        "device_rounds": len(ok),
        "rounds": len(rounds),
        "stragglers": sum(r["stragglers"] for r in rounds),
        "dropped": sum(r["dropped"] for r in rounds),
        "failed": sum(r["failed"] for r in rounds),
        "failed_by_reason": _failures_by_reason(device_rows),
        "uplift_rouge1": ci([r["rouge1"] - r["base_rouge1"] for r in devices]),
        "uplift_rougeL": ci([r["rougeL"] - r["base_rougeL"] for r in devices]),
        # answer-token loss (log perplexity): a mean of perplexities is ruled by a few devices whose user
        # signs answers with a name the base model has never seen (base perplexity up to ~1200)
        "answer_loss_reduction_nats": ci([_log(r["base_perplexity"]) - _log(r["perplexity"]) for r in devices]),
        "median_perplexity": [_median([r["base_perplexity"] for r in devices]),
                              _median([r["perplexity"] for r in devices])],
        "rouge1": ci([r["rouge1"] for r in devices]),
        "base_rouge1": ci([r["base_rouge1"] for r in devices]),
        "satisfaction": ci([r["accept_rate"] for r in devices]),
        "base_satisfaction": ci([r["base_accept_rate"] for r in devices]),
        # the adaptation gate, over the devices' lifetimes (each device row carries its running counts)
        "gate_accepted": sum(int(r.get("gate_accepted", 0)) for r in devices),
        "gate_rejected": sum(int(r.get("gate_rejected", 0)) for r in devices),
        "gate_waiting": sum(int(r.get("gate_waiting", 0)) for r in devices),
        # devices with no adapter of their own whose user's feedback picked the global adapter ([federated] cold_adoption)
        "using_global_adapter": sum(int(r.get("uses_global", 0)) for r in devices),
        # the length-aware figure beside ROUGE-1: how much of the user's own answer an answer covers, in order
        "uplift_rougeL_recall": ci([r.get("rougeL_recall", math.nan) - r.get("base_rougeL_recall", math.nan)
                                    for r in devices]),
        # fedasls.lm.cuts over every completed device round: text cut to fit the model's window
        "cuts": {name: _cut_share(ok, name) for name in ("prompts", "answers", "answer_tokens")},
        "fleet_virtual_seconds": sum(r["virtual_round_s"] for r in rounds),
        "wall_seconds": wall_seconds,
        "device_rounds_per_second": len(ok) / wall_seconds if wall_seconds > 0 else math.nan,
        "user_level_privacy": _user_level_privacy(run_dir),
        "example_level_epsilon": _example_level(devices, run_dir),
    }


def _cut_share(rows: list[dict[str, Any]], name: str) -> float:
    """Share of `name` (prompts, answers, answer_tokens) cut, summed over device rounds (NaN: none counted)."""
    total = sum(int(r.get(name, 0)) for r in rows)
    return sum(int(r.get(f"{name}_cut", 0)) for r in rows) / total if total else math.nan


def _log(value: float) -> float:
    return math.log(value) if value > 0 else math.nan


def _median(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def _failures_by_reason(device_rows: list[dict[str, Any]]) -> dict[str, int]:
    """Failed device rounds by reason ("error", "corrupt_state", ...), from the per-device rows."""
    counts: dict[str, int] = defaultdict(int)
    for row in device_rows:
        if row.get("failure"):
            counts[row["failure"]] += 1
    return dict(sorted(counts.items()))
def _example_level(devices: list[dict[str, Any]], run_dir: Path) -> dict[str, float] | None:
    """Devices' example-level (DP-SGD, opacus RDP, add/remove, Poisson) epsilons across the population."""
    eps = [r["epsilon"] for r in devices if isinstance(r.get("epsilon"), (int, float)) and math.isfinite(r["epsilon"])]
    if not eps:
        return None
    mean, low, high = mean_ci(eps)
    config = run_dir / "config.toml"
    delta = tomllib.loads(config.read_text()).get("adaptation", {}).get("delta") if config.is_file() else None
    return {"mean": mean, "low": low, "high": high, "max": max(eps), "devices": len(eps),
            "delta": delta if delta is not None else math.nan}


def _user_level_privacy(run_dir: Path) -> str | None:
    """The DP-FedAvg epsilon report of the run (privacy.json), with its delta, sampling and relation."""
    path = run_dir / "privacy.json"
    return json.loads(path.read_text())["report"] if path.is_file() else None


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""

    def fmt_ci(v: list[float]) -> str:
        mean, low, high = v
        return "n/a" if math.isnan(mean) else f"{mean:+.4f}  [{low:+.4f}, {high:+.4f}]"

    rows = [
        ("ROUGE-1 uplift (personal - base)", fmt_ci(summary["uplift_rouge1"])),
        ("ROUGE-L uplift", fmt_ci(summary["uplift_rougeL"])),
        ("answer loss reduction, nats (base - personal)", fmt_ci(summary["answer_loss_reduction_nats"])),
        *([("ROUGE-L recall uplift (length-aware)", fmt_ci(summary["uplift_rougeL_recall"]))]
          if not math.isnan(summary.get("uplift_rougeL_recall", [math.nan])[0]) else []),
        ("median perplexity, base -> personal", "{:.1f} -> {:.1f}".format(*summary["median_perplexity"])),
        ("satisfaction (accept rate), personal", fmt_ci(summary["satisfaction"])),
        ("satisfaction (accept rate), base", fmt_ci(summary["base_satisfaction"])),
        ("adapters kept / rejected by the gate / waiting",
         f"{summary.get('gate_accepted', 0)} / {summary.get('gate_rejected', 0)} / {summary.get('gate_waiting', 0)}"),
        *([("devices without an adapter using the global one", str(summary["using_global_adapter"]))]
          if summary.get("using_global_adapter") else []),
        *([("cut to fit the window: prompts / training answers / answer tokens",
            " / ".join("n/a" if math.isnan(v) else f"{v:.1%}" for v in summary["cuts"].values()))]
          if any(not math.isnan(v) for v in summary.get("cuts", {}).values()) else []),
        ("devices that participated", str(summary["devices_participated"])),
        ("device-rounds completed", str(summary["device_rounds"])),
        ("stragglers / dropped / failed", f"{summary['stragglers']} / {summary['dropped']} / {summary['failed']}"
         + (" (" + ", ".join(f"{k} {v}" for k, v in summary.get("failed_by_reason", {}).items()) + ")"
            if summary.get("failed_by_reason") else "")),
        ("simulated fleet time", f"{summary['fleet_virtual_seconds']:.0f} s"),
        ("wall time", "n/a (pass --wall-seconds)" if math.isnan(summary["wall_seconds"])
         else f"{summary['wall_seconds']:.1f} s"),
        ("device-rounds per second", "n/a" if math.isnan(summary["device_rounds_per_second"])
         else f"{summary['device_rounds_per_second']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "figure".ljust(width) + "  value (mean [95% CI] over devices)", "-" * (width + 40)]
    lines += [k.ljust(width) + "  " + v for k, v in rows]
    if summary.get("example_level_epsilon"):
        e = summary["example_level_epsilon"]
        lines.append(f"example-level DP-SGD epsilon over {e['devices']} devices: mean {e['mean']:.3g} "
                     f"[{e['low']:.3g}, {e['high']:.3g}], max {e['max']:.3g}, delta {e['delta']:g} "
                     "(opacus RDP; Poisson sampling of examples; add/remove-one example)")
    if summary.get("user_level_privacy"):
        lines.append("user-level DP on the global adapter: " + summary["user_level_privacy"])
    return "\n".join(lines)


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's PNG plots and return their paths."""
    rounds = read_jsonl(run_dir / ROUNDS_FILE)
    device_rows = read_jsonl(run_dir / DEVICE_ROUNDS_FILE)
    devices = last_participation(device_rows)
    paths = [run_dir / name for name in PLOTS]

    fig, ax = plt.subplots(figsize=(6, 4))
    uplift = [r["rouge1"] - r["base_rouge1"] for r in devices]
    ax.hist(uplift, bins=min(30, max(5, len(uplift) // 3)), color="#4477aa")
    ax.axvline(0, color="black", lw=1)
    ax.set(xlabel="ROUGE-1 uplift (personalized - base)", ylabel="devices", title="Personalization uplift across devices")
    _save(fig, paths[0])

    fig, ax1 = plt.subplots(figsize=(6, 4))
    x = [r["round"] for r in rounds]
    ax1.plot(x, [r["rouge1_mean"] for r in rounds], "o-", label="ROUGE-1 personalized")
    ax1.plot(x, [r["base_rouge1_mean"] for r in rounds], "s--", label="ROUGE-1 base")
    ax1.set(xlabel="round", ylabel="ROUGE-1 (completed devices)", xticks=x)
    ax2 = ax1.twinx()
    ax2.plot(x, [r["perplexity_mean"] for r in rounds], "^:", color="#cc6677", label="perplexity personalized")
    ax2.set_ylabel("perplexity")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax1.set_title("Metrics over rounds")
    _save(fig, paths[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x, [r["virtual_round_s"] for r in rounds], color="#228833")
    ax.set(xlabel="round", ylabel="simulated seconds", title="Virtual time per round (K-th fastest / deadline)", xticks=x)
    _save(fig, paths[2])

    fig, ax = plt.subplots(figsize=(6, 4))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in device_rows:
        counts[r["tier"]][r["role"]] += 1
    order = {"low": 0, "mid": 1, "high": 2}  # the default tiers by capability; others after, by name
    tiers = sorted(counts, key=lambda t: (order.get(t, len(order)), t))
    bottom = [0] * len(tiers)
    for role, color in (("completed", "#228833"), ("straggler", "#ccbb44"), ("dropped", "#ee6677"),
                        ("failed", "#aa3377")):
        vals = [counts[t][role] for t in tiers]
        ax.bar(tiers, vals, bottom=bottom, label=role, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(xlabel="device tier", ylabel="device-rounds", title="Participation by tier")
    ax.legend()
    _save(fig, paths[3])
    return paths


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUMMARY_FILE = "summary.json"


def write_report(run_dir: Path, wall_seconds: float) -> dict[str, Any]:
    """CSV copies of the JSONL records, summary.json and the plots; returns the summary."""
    write_csv(run_dir / "rounds.csv", read_jsonl(run_dir / ROUNDS_FILE))
    write_csv(run_dir / "device_rounds.csv", read_jsonl(run_dir / DEVICE_ROUNDS_FILE))
    summary = summarize(run_dir, wall_seconds)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    plot_run(run_dir)
    return summary


def recorded_wall_seconds(run_dir: Path) -> float:
    """The wall time an earlier `write_report` recorded in the run's summary.json, else NaN."""
    try:
        return float(json.loads((run_dir / SUMMARY_FILE).read_text())["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan
