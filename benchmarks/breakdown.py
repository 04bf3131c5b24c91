"""Where a device round's time goes: per-stage cost table (CSV), stacked bar plot (PNG), training FLOP/s.

Runs devices 0..N-1 of a scenario at one virtual day, on a fresh store, in ONE process, calling
the Flower ClientApp exactly as a worker does (so messaging is real), with the per-stage timer
of fedasls.device.timing. Every figure has wall and CPU seconds and the load average next to it; compare
before/after by CPU seconds when the machine is shared. What a worker builds once and then shares
with all its devices ("worker_setup": the base model, the lexicons, the paraphrase probe) is
reported apart and excluded from the device-round totals.

Training efficiency: device 0's buffered items are trained on once with the round's settings;
FLOPs are counted by torch's FlopCounterMode in a second, identical run; achieved FLOP/s (by CPU
time) is set against torch's float32 matmul FLOP/s on the same threads (a large square matmul and
one of the model's own shapes).

    python -m benchmarks.breakdown                                   # quickstart, 6 devices, day 6
    python -m benchmarks.breakdown --no-embedded --model smollm2-135m-instruct --devices 2 --no-flops
    python -m benchmarks.breakdown --model /path/to/SmolLM2-135M-Instruct-hf
    python -m benchmarks.breakdown --no-embedded --model smollm2-135m-instruct --devices 2 --batch-devices
    python -m benchmarks.breakdown --set adaptation.fused_adamw=false   # a speed-up off (each one is a setting)
    python -m benchmarks.breakdown --save-baseline before            # commit benchmarks/baselines/

Outputs under --out: breakdown.csv, breakdown.json, breakdown.png.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.measure import (BASELINES, RESULTS, Meter, add_run_arguments, command_line, config_path, load_avg,
                                machine, matmul_flops, parser, run_overrides, write_json)

EMBEDDED = "embedded"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_run_arguments(p, out=str(RESULTS / "breakdown"), with_model=False)
    p.add_argument("--devices", type=int, default=6, help="devices 0..N-1 (default 6)")
    p.add_argument("--day", type=float, default=6.0, help="virtual day of the round (default 6)")
    p.add_argument("--model", dest="models", action="append", default=[],
                   help="a model preset (smollm2-135m-instruct) or a local Hugging Face causal-LM folder to measure "
                        "besides the embedded model, with that model's adaptation defaults (repeatable; a missing "
                        "folder is skipped with a message)")
    p.add_argument("--batch-devices", action="store_true",
                   help="run the devices as ONE worker slot's batch with simulation.batch_devices = true (their "
                        "generation and answer losses batched together) instead of one ClientApp call each")
    p.add_argument("--no-embedded", action="store_true", help="measure only the --model folders")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Ray worker)")
    p.add_argument("--no-flops", action="store_true", help="skip the training FLOP/s measurement")
    p.add_argument("--save-baseline", metavar="NAME",
                   help="also write the summary to benchmarks/baselines/breakdown-NAME.json (committed)")
    return p.parse_args(argv)


def _models(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(label, preset name or folder) pairs; None is the embedded default. Missing folders are skipped loudly."""
    from fedasls.lm.presets import is_preset

    out: list[tuple[str, str | None]] = [] if args.no_embedded else [(EMBEDDED, None)]
    for path in args.models:
        if is_preset(path):
            out.append((path, path))
            continue
        if not Path(path).expanduser().is_dir():
            print(f"skipping model {path}: no such folder (pass a local Hugging Face causal-LM folder, e.g. "
                  "one built by `fedasls model build --preset smollm2-135m-instruct`)", file=sys.stderr)
            continue
        out.append((Path(path).name, str(Path(path).expanduser().resolve())))
    return out


def _call(app: Any, message_type: str, config: dict[str, Any]) -> dict[str, float]:
    """One ClientApp call as Flower makes it (mods included); returns the reply's metrics."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # set by Flower inside a run
    msg = Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1, message_type=message_type)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, context)
    if reply.has_error():
        raise RuntimeError(f"device round failed: {reply.error.reason}")
    return dict(reply.content["metrics"])


def run_settings(model: str | None, args: argparse.Namespace) -> Any:
    """The settings of one model's rounds. The model (a preset or a folder; None = the embedded one) goes in
    with the other overrides, so that its adaptation defaults apply (a folder patched in afterwards kept the
    embedded model's: all seven projections, 6 epochs, lr 5e-3)."""
    from fedasls.config import load_settings
    from fedasls.lm.presets import model_override

    overrides = run_overrides(args, [model_override(model)] if model else [])
    if args.batch_devices:  # one process runs them all, on --threads torch threads in all
        overrides += ["simulation.batch_devices=true", f"simulation.devices_per_worker={args.devices}",
                      f"simulation.cpus_per_worker={args.threads / args.devices}"]
    else:
        overrides += [f"simulation.cpus_per_worker={float(args.threads)}"]
    return load_settings(config_path(args.config), overrides)


def measure_model(label: str, path: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Run the device rounds of one model; per-stage and per-device figures."""
    import torch

    from clients.app import app
    # what a worker's first device round imports (torch, transformers, peft ...), here and not inside the
    # measured rounds: it is process setup, like the model load ("worker_setup")
    import fedasls.device.round  # noqa: F401
    import fedasls.device.faults  # noqa: F401
    import fedasls.sim.simulated_timing  # noqa: F401
    from fedasls.lm.model import ensure_model
    from fedasls.device.timing import record

    settings = run_settings(path, args)
    model_path = str(ensure_model(settings.model))
    settings = settings.model_copy(update={"model": settings.model.at_path(model_path)})
    torch.set_num_threads(args.threads)
    now = args.day * 86400.0
    per_device: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedasls-breakdown-") as store, record() as timer:
        settings_json = settings.model_dump_json()
        for device_id in ([] if args.batch_devices else range(args.devices)):
            config = {"device-id": device_id, "now": now, "server-round": 1, "settings": settings_json, "store": store}
            with Meter() as m:
                metrics = _call(app, "train", config)
            setup = metrics.get("stage_worker_setup_s", 0.0), metrics.get("stage_worker_setup_cpu_s", 0.0)
            per_device.append({
                "device_id": device_id, "wall_s": m.wall - setup[0], "cpu_s": m.cpu - setup[1],
                "load": m.load_after, "adapted": int(metrics["adapted"]), "examples": int(metrics["examples"]),
                "rouge1": metrics["rouge1"], "base_rouge1": metrics["base_rouge1"],
                **{k: v for k, v in metrics.items() if k.startswith("stage_")},
            })
        if args.batch_devices:
            per_device = _batched_round(app, settings_json, store, now, args.devices)
    stages = _stage_sums(per_device) if args.batch_devices else timer.seconds()  # device threads time their own
    setup = stages.pop("worker_setup", None)
    stages.pop("messaging", None)  # measured from outside the round below
    total_wall = sum(d["wall_s"] for d in per_device)
    total_cpu = sum(d["cpu_s"] for d in per_device)
    rows = [{"model": label, "stage": name, "wall_s": t.wall, "cpu_s": t.cpu, "calls": t.calls,
             "cpu_share": t.cpu / total_cpu if total_cpu else 0.0} for name, t in stages.items()]
    other_wall = total_wall - sum(r["wall_s"] for r in rows)
    other_cpu = total_cpu - sum(r["cpu_s"] for r in rows)
    # messaging: the ClientApp call outside the device round (message decode, privacy-guard mod, reply build)
    rows.append({"model": label, "stage": "messaging", "wall_s": other_wall, "cpu_s": other_cpu, "calls": len(per_device),
                 "cpu_share": other_cpu / total_cpu if total_cpu else 0.0})
    result: dict[str, Any] = {
        "model": label, "model_path": model_path, "devices": args.devices, "day": args.day,
        "device_rounds_wall_s": total_wall, "device_rounds_cpu_s": total_cpu,
        "worker_setup_wall_s": setup.wall if setup else 0.0, "worker_setup_cpu_s": setup.cpu if setup else 0.0,
        "load_avg_1m": load_avg(), "stages": rows, "per_device": per_device,
        "adapted": sum(d["adapted"] for d in per_device),
        "rouge1_mean": sum(d["rouge1"] for d in per_device) / len(per_device),
        "base_rouge1_mean": sum(d["base_rouge1"] for d in per_device) / len(per_device),
    }
    if not args.no_flops:
        result["training_flops"] = training_efficiency(settings, args.day)
    return result


def _batched_round(app: Any, settings_json: str, store: str, now: float, devices: int) -> list[dict[str, Any]]:
    """All devices in one worker slot's message (simulation.batch_devices): per-device figures from each
    device's stage times, the call's remaining CPU (messaging, turn-taking) shared evenly."""
    from fedasls.device.timing import STAGES

    config = {"device-ids": list(range(devices)), "parallel": 1, "now": now, "server-round": 1,
              "settings": settings_json, "store": store}
    with Meter() as m:
        replies = _call_batch(app, config, store)
    rows = []
    for metrics in replies:
        cpu = sum(metrics.get(f"stage_{n}_cpu_s", 0.0) for n in STAGES if n != "worker_setup")
        wall = sum(metrics.get(f"stage_{n}_s", 0.0) for n in STAGES if n != "worker_setup")
        rows.append({"device_id": int(metrics["device_id"]), "wall_s": wall, "cpu_s": cpu, "load": m.load_after,
                     "adapted": int(metrics["adapted"]), "examples": int(metrics["examples"]),
                     "rouge1": metrics["rouge1"], "base_rouge1": metrics["base_rouge1"],
                     **{k: v for k, v in metrics.items() if k.startswith("stage_")}})
    setup = sum(r.get("stage_worker_setup_cpu_s", 0.0) for r in rows), sum(r.get("stage_worker_setup_s", 0.0) for r in rows)
    rest_cpu = (m.cpu - setup[0] - sum(r["cpu_s"] for r in rows)) / max(len(rows), 1)
    rest_wall = (m.wall - setup[1] - sum(r["wall_s"] for r in rows)) / max(len(rows), 1)
    for r in rows:
        r["cpu_s"] += rest_cpu
        r["wall_s"] += rest_wall
    return rows


def _stage_sums(per_device: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage -> StageTime summed over the devices' reply metrics (stage_<name>_s / _cpu_s)."""
    from fedasls.device.timing import STAGES, StageTime

    out = {}
    for name in STAGES:
        t = StageTime(sum(d.get(f"stage_{name}_s", 0.0) for d in per_device),
                      sum(d.get(f"stage_{name}_cpu_s", 0.0) for d in per_device), len(per_device))
        if t.wall or t.cpu:
            out[name] = t
    return out


def _call_batch(app: Any, config: dict[str, Any], store: str) -> list[dict[str, float]]:
    """One worker slot's message for several devices; each device's reply metrics. A failed device round
    raises with its traceback (the device's errors.log in the temporary `store`, gone after the run)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from wire.messages import device_metrics

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    msg = Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, context)
    if reply.has_error():
        raise RuntimeError(f"device rounds failed: {reply.error.reason}")
    rows = device_metrics(reply)
    if len(rows) != len(config["device-ids"]):
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(Path(store).rglob("errors.log")))
        raise RuntimeError(f"{len(config['device-ids']) - len(rows)} device round(s) failed; their errors.log:\n{logs}")
    return rows


def training_efficiency(settings: Any, day: float) -> dict[str, float]:
    """Achieved training FLOP/s on device 0's buffer vs torch matmul FLOP/s on the same threads."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedasls.pipeline.training import TrainingExample, train_adapter
    from fedasls.lm.lora import reset_adapter
    from fedasls.device.device import Device
    from fedasls.interaction import STREAM_EPOCH
    from fedasls.device.worker import DeviceRuntime

    runtime = DeviceRuntime(settings)
    device = Device(0, runtime, settings)
    device.catch_up(until=STREAM_EPOCH + day * 86400.0)
    examples = [TrainingExample(it.question, it.preferred) for it in device.selector.interactions()]
    if not examples:
        return {}
    model = device.activate()
    reset_adapter(model, seed=1)
    with Meter() as m:
        result = train_adapter(model, runtime.prompts, examples, settings.adaptation, seed=1)
    reset_adapter(model, seed=1)
    with FlopCounterMode(display=False) as counter:
        train_adapter(model, runtime.prompts, examples, settings.adaptation, seed=1)
    flops = float(counter.get_total_flops())
    hidden = int(model.config.hidden_size)
    tokens = settings.adaptation.batch_size * 64  # a typical batch of answer-length sequences
    achieved = flops / m.cpu if m.cpu else 0.0
    peak = matmul_flops(512)
    shaped = matmul_flops(tokens, hidden, hidden)
    return {
        "examples": len(examples), "steps": result.steps, "train_wall_s": m.wall, "train_cpu_s": m.cpu,
        "flops": flops, "achieved_flops_per_s": achieved, "matmul_512_flops_per_s": peak,
        f"matmul_{tokens}x{hidden}x{hidden}_flops_per_s": shaped,
        "fraction_of_matmul_512": achieved / peak if peak else 0.0,
        "fraction_of_model_shape_matmul": achieved / shaped if shaped else 0.0,
        "torch_threads": torch.get_num_threads(),
    }


def write_csv(path: Path, results: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "stage", "wall_s", "cpu_s", "calls", "cpu_share"])
        writer.writeheader()
        for r in results:
            writer.writerows(r["stages"])


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    """One panel per model: a stacked bar of CPU seconds per stage for each device round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedasls.device.timing import STAGES

    names = [s for s in STAGES if s != "worker_setup"]
    colors = dict(zip(names, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        bottom = [0.0] * len(r["per_device"])
        x = [d["device_id"] for d in r["per_device"]]
        for name in names:
            if name == "messaging":
                values = [d["cpu_s"] - sum(v for k, v in d.items() if k.startswith("stage_") and k.endswith("_cpu_s")
                                           and k != "stage_worker_setup_cpu_s") for d in r["per_device"]]
            else:
                values = [d.get(f"stage_{name}_cpu_s", 0.0) for d in r["per_device"]]
            if not any(v > 1e-4 for v in values):
                continue
            ax.bar(x, values, bottom=bottom, label=name, color=colors[name])
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"{r['model']}: {r['device_rounds_cpu_s']:.1f} CPU s for {r['devices']} device rounds")
        ax.set_xlabel("device")
        ax.set_ylabel("CPU seconds")
        ax.set_xticks(x)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: list[dict[str, Any]]) -> None:
    for r in results:
        n = r["devices"]
        print(f"\n{r['model']}: {n} device rounds, day {r['day']:g}, load {r['load_avg_1m']:.2f}  "
              f"total {r['device_rounds_wall_s']:.2f} s wall / {r['device_rounds_cpu_s']:.2f} s CPU  "
              f"({r['device_rounds_cpu_s'] / n:.2f} CPU s per round; worker set-up {r['worker_setup_wall_s']:.2f} s "
              f"wall / {r['worker_setup_cpu_s']:.2f} s CPU, not counted)")
        print(f"  adapted {r['adapted']}/{n}, mean ROUGE-1 {r['rouge1_mean']:.3f} (base {r['base_rouge1_mean']:.3f})")
        print(f"  {'stage':<12}{'wall s':>9}{'CPU s':>9}{'CPU %':>8}{'calls':>7}")
        for s in r["stages"]:
            print(f"  {s['stage']:<12}{s['wall_s']:>9.3f}{s['cpu_s']:>9.3f}{100 * s['cpu_share']:>7.1f}%{s['calls']:>7}")
        f = r.get("training_flops")
        if f:
            print(f"  training: {f['steps']} steps on {f['examples']} examples, {f['flops'] / 1e9:.2f} GFLOP in "
                  f"{f['train_cpu_s']:.2f} CPU s = {f['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s; torch matmul "
                  f"{f['matmul_512_flops_per_s'] / 1e9:.1f} GFLOP/s (512^3) -> {100 * f['fraction_of_matmul_512']:.1f}%, "
                  f"model-shape matmul -> {100 * f['fraction_of_model_shape_matmul']:.1f}% "
                  f"({f['torch_threads']} thread(s))")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    models = _models(args)
    if not models:
        raise SystemExit("breakdown: nothing to measure (every --model was missing and --no-embedded was given)")
    results = [measure_model(label, path, args) for label, path in models]
    out = Path(args.out)
    summary = {"command": command_line("benchmarks.breakdown", argv),
               "machine": machine(), "settings": {"config": args.config, "overrides": args.overrides,
                                                  "threads": args.threads}, "results": results}
    write_csv(out / "breakdown.csv", results)
    write_json(out / "breakdown.json", summary)
    plot(out / "breakdown.png", results)
    print_table(results)
    print(f"\nmachine: {summary['machine']}")
    print(f"written: {out / 'breakdown.csv'}, {out / 'breakdown.json'}, {out / 'breakdown.png'}")
    if args.save_baseline:
        slim = {**summary, "results": [{k: v for k, v in r.items() if k != "per_device"} for r in results]}
        print(f"baseline: {write_json(BASELINES / f'breakdown-{args.save_baseline}.json', slim)}")
    return summary


if __name__ == "__main__":
    main()
