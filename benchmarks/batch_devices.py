"""Does batching a worker's devices change what they decide? The same devices, batched and unbatched.

Runs devices 0..N-1 of a scenario for the same virtual days twice on fresh stores, in one process:
once each device alone (simulation.batch_devices = false, today's exact behaviour) and once all of
them as one worker slot's batch (fedasls.device.batched: greedy answers and answer losses in shared
mixed-adapter batches). Prints, per device: how many greedy answers differ (compared call by call),
whether any adaptation's status, gate figures or shrink scale moved, and the evaluation metrics of
each run; and both runs' CPU seconds. Greedy tokens can flip under other padding (a near-tie);
this says how often, and whether it moved anything a device decides.

    python -m benchmarks.batch_devices                                        # embedded model, 4 devices
    python -m benchmarks.batch_devices --model smollm2-135m-instruct --devices 2 --days 6

Outputs under --out: batch_devices.json.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.measure import (RESULTS, Meter, add_run_arguments, command_line, load_run_settings, machine,
                                parser, write_json)

# what an adaptation decided: its status and the gate's figures (AdaptReport fields)
DECISION_KEYS = ("status", "attempts", "epochs", "best_epoch", "scale", "kept_heldback_rouge1", "new_heldback_rouge1",
                 "kept_heldback_loss", "new_heldback_loss", "examples", "heldback")
METRIC_KEYS = ("rouge1", "rougeL", "perplexity", "accept_rate", "base_rouge1", "base_perplexity", "adapted",
               "gate_accepted", "gate_rejected")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_run_arguments(p, out=str(RESULTS / "batch_devices"))
    p.add_argument("--devices", type=int, default=4, help="devices 0..N-1 (default 4)")
    p.add_argument("--days", type=float, nargs="+", default=[6.0], help="virtual days of the rounds (default 6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def run(settings: Any, devices: list[int], days: list[float], batched: bool) -> dict[str, Any]:
    """Each device's rounds (metrics, adaptation history) and every greedy answer it generated, in call order."""
    from fedasls.device.batched import run_batched
    from fedasls.device.round import run_device_round
    from fedasls.device.store import DeviceStore
    from fedasls.device.worker import DeviceRuntime
    from fedasls.lm import batching
    from fedasls.sim.heterogeneity import HeterogeneityModel

    runtime = DeviceRuntime(settings)
    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
    runtime.embedder, runtime.lexicons  # noqa: B018 - worker set-up, outside the measured rounds
    answers: dict[int, list[tuple[str, str]]] = {d: [] for d in devices}
    rounds: dict[int, list[dict[str, Any]]] = {d: [] for d in devices}
    with tempfile.TemporaryDirectory(prefix="fedasls-batch-") as store, Meter() as meter:
        def device_round(device_id: int, day: float):
            def call():
                with batching.record_answers() as log:
                    result = run_device_round(device_id, day * 86400.0, runtime, settings, DeviceStore(store), hetero)
                answers[device_id] += log
                state = DeviceStore(store).load(device_id) or {}
                return result.metrics(), state.get("counters", {}).get("history", [])
            return call

        for day in days:
            calls = [device_round(d, day) for d in devices]
            outcomes = ([f.result() for f in run_batched(runtime.model, calls)] if batched
                        else [call() for call in calls])
            for d, (metrics, history) in zip(devices, outcomes):
                rounds[d].append({"day": day, "metrics": metrics, "history": history})
    return {"cpu_s": meter.cpu, "wall_s": meter.wall, "answers": answers, "rounds": rounds}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def compare(alone: dict[str, Any], together: dict[str, Any], devices: list[int]) -> list[dict[str, Any]]:
    """Per device: answers compared / differing, adaptation decisions and round metrics that moved."""
    rows = []
    for d in devices:
        a, b = alone["answers"][d], together["answers"][d]
        differing = sum(x[1] != y[1] for x, y in zip(a, b)) + abs(len(a) - len(b))
        decisions, metrics = [], []
        for ra, rb in zip(alone["rounds"][d], together["rounds"][d]):
            ha, hb = ra["history"], rb["history"]
            if len(ha) != len(hb):
                decisions.append(f"day {ra['day']:g}: {len(ha)} vs {len(hb)} adaptations")
            for k, (x, y) in enumerate(zip(ha, hb)):
                moved = [key for key in DECISION_KEYS if not _same(x.get(key), y.get(key))]
                if moved:
                    decisions.append(f"day {ra['day']:g} adaptation {k}: " + ", ".join(
                        f"{key} {x.get(key)!r} -> {y.get(key)!r}" for key in moved))
            for key in METRIC_KEYS:
                x, y = ra["metrics"].get(key), rb["metrics"].get(key)
                if not _same(x, y):
                    metrics.append(f"day {ra['day']:g}: {key} {x:.4g} -> {y:.4g}")
        rows.append({"device_id": d, "answers": len(a), "answers_differing": differing,
                     "decisions_moved": decisions, "metrics_moved": metrics,
                     "statuses": [h.get("status") for r in alone["rounds"][d] for h in r["history"]],
                     "rouge1_alone": alone["rounds"][d][-1]["metrics"]["rouge1"],
                     "rouge1_batched": together["rounds"][d][-1]["metrics"]["rouge1"]})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = load_run_settings(args)
    devices = list(range(args.devices))
    alone = run(settings, devices, args.days, batched=False)
    together = run(settings, devices, args.days, batched=True)
    rows = compare(alone, together, devices)
    summary = {"command": command_line("benchmarks.batch_devices", argv), "machine": machine(),
               "settings": {"config": args.config, "overrides": args.overrides, "model": args.model},
               "devices": args.devices, "days": args.days,
               "unbatched_cpu_s": alone["cpu_s"], "batched_cpu_s": together["cpu_s"],
               "unbatched_wall_s": alone["wall_s"], "batched_wall_s": together["wall_s"], "per_device": rows}
    print(f"{args.devices} devices, days {args.days}: unbatched {alone['cpu_s']:.1f} CPU s, batched "
          f"{together['cpu_s']:.1f} CPU s (one process, {args.threads} torch thread(s))")
    for r in rows:
        print(f"  device {r['device_id']}: {r['answers_differing']}/{r['answers']} greedy answers differ; "
              f"statuses {r['statuses']}; ROUGE-1 {r['rouge1_alone']:.4f} -> {r['rouge1_batched']:.4f}; "
              f"decisions moved: {r['decisions_moved'] or 'none'}; metrics moved: {r['metrics_moved'] or 'none'}")
    out = Path(args.out) / "batch_devices.json"
    print(f"written: {write_json(out, summary)}")
    return summary


if __name__ == "__main__":
    main()
