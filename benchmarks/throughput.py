"""Device-rounds per second: fedasls on Flower vs a naive Flower client vs a bare loop, in one run.

The same devices (0..N-1, every one in every round), the same rounds (virtual days), the same
model and settings, the same number of worker processes:

  (a) fedasls    `fedasls simulate`'s path: Flower Simulation Engine (Ray), the fedasls ServerApp
                 fleet loop and ClientApp (one base model per worker, adapters swapped, adaptive trigger).
  (b) naive      a Flower ClientApp in the style of Flower's LLM fine-tuning examples
                 (benchmarks/naive_flower.py): loads the base model on every call and fine-tunes on
                 all of the device's data, same training loop and LoRA settings.
  (c) bare       the same worker count as plain processes (no Flower, no Ray) calling
                 fedasls.device.round.run_device_round directly, one base model per process.

Each variant runs in its own process; its whole process tree's CPU seconds are sampled (Ray
included). Rates are device rounds per wall second, end to end (startup included) and after the
first round (steady state); CPU seconds per device round and the load average stand next to
them, since the machine may be shared. Held-out ROUGE-1 of each variant's last round is printed
next to its rate, with a 95% CI over devices. Targets on 2 cores: a/b >= 5, a/c >= 0.8.

    python -m benchmarks.throughput                      # 12 devices x 3 rounds, 2 workers
    python -m benchmarks.throughput --quick              # 4 devices x 2 rounds
    python -m benchmarks.throughput --model smollm2-135m-instruct --devices 3 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import (BASELINES, REPO, RESULTS, TreeCPU, add_run_arguments, command_line, load_avg,
                                load_run_settings, machine, parser, write_json)

VARIANTS = ("fedasls", "naive", "bare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    add_run_arguments(p, out=str(RESULTS / "throughput"))
    p.add_argument("--devices", type=int, default=12, help="devices 0..N-1, all in every round (default 12)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, one virtual day apart (default 3)")
    p.add_argument("--start-day", type=float, default=4.0, help="virtual day of round 1 (default 4)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of every variant (default 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="4 devices x 2 rounds")
    p.add_argument("--save-baseline", metavar="NAME", help="also write benchmarks/baselines/throughput-NAME.json")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant here
    p.add_argument("--settings-file", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.devices, args.rounds = 4, 2
    return args


def bench_settings(args: argparse.Namespace) -> Any:
    """The scenario with every device in every round: cohort = population, no dropouts, always online."""
    overrides = [
        f"population.num_devices={args.devices}",
        f"simulation.cohort_size={args.devices}",
        "simulation.overcommit=1.0",
        "simulation.deadline_s=0",
        f"simulation.rounds={args.rounds}",
        f"simulation.start_time_s={args.start_day * 86400.0}",
        "simulation.round_interval_s=86400.0",
        f"simulation.workers={args.workers}",
        "simulation.cpus_per_worker=1.0",
        'heterogeneity.availability="always"',
        "heterogeneity.dropout_scale=0.0",
    ]
    return load_run_settings(args, overrides)  # the model built once here, outside any timing


# --------------------------------------------------------------------------- the variants


def run_fedasls(settings: Any, work: Path) -> dict[str, Any]:
    from simulations.runner import simulate

    s = settings.model_copy(update={"simulation": settings.simulation.model_copy(update={"output_dir": str(work)})})
    run = simulate(s, work / "run", quiet=True)
    rounds = [json.loads(line) for line in (run.run_dir / "rounds.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (run.run_dir / "device_rounds.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["round"] == len(rounds) and r["role"] == "completed"]
    return {"round_wall_s": [r["wall_s"] for r in rounds], "device_rounds": sum(r["completed"] for r in rounds),
            "rouge1": [r["rouge1"] for r in last], "adapted": sum(r["adapted"] for r in rounds),
            "work_cpu_s": sum(_work_cpu(r) for r in rows)}


def _work_cpu(metrics: dict[str, Any]) -> float:
    """CPU seconds of a device round's own stages (fedasls.device.timing), model loading excluded."""
    return sum(v for k, v in metrics.items() if k.startswith("stage_") and k.endswith("_cpu_s")
               and k != "stage_worker_setup_cpu_s")


def run_naive(settings: Any, work: Path) -> dict[str, Any]:
    import logging

    from flwr.simulation import run_simulation

    from benchmarks.naive_flower import client_app, make_server_app
    from simulations.runner import backend_config, plan_workers

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").propagate = False
    devices = list(range(settings.population.num_devices))
    rounds: list[dict] = []
    run_simulation(server_app=make_server_app(settings, devices, rounds), client_app=client_app,
                   num_supernodes=len(devices), backend_name="ray",
                   backend_config=backend_config(settings, plan_workers(settings)))
    if len(rounds) != settings.simulation.rounds:
        raise RuntimeError(f"naive variant finished {len(rounds)} of {settings.simulation.rounds} rounds")
    return {"round_wall_s": [r["wall_s"] for r in rounds], "device_rounds": sum(len(r["devices"]) for r in rounds),
            "rouge1": [d["rouge1"] for d in rounds[-1]["devices"]], "adapted": sum(len(r["devices"]) for r in rounds),
            "work_cpu_s": sum(d["work_cpu_s"] for r in rounds for d in r["devices"])}


_BARE: dict[str, Any] = {}


def _bare_init(settings_json: str, store: str) -> None:
    import torch

    from fedasls.config import Settings
    from fedasls.sim.heterogeneity import HeterogeneityModel
    from fedasls.device.worker import DeviceRuntime
    from fedasls.device.store import DeviceStore

    torch.set_num_threads(1)
    settings = Settings.model_validate_json(settings_json)
    _BARE.update(settings=settings, runtime=DeviceRuntime(settings), store=DeviceStore(store),
                 hetero=HeterogeneityModel.from_settings(settings.heterogeneity))


def _bare_round(job: tuple[int, float]) -> dict[str, float]:
    from fedasls.device.round import run_device_round

    device_id, now = job
    return run_device_round(device_id, now, _BARE["runtime"], _BARE["settings"], _BARE["store"], _BARE["hetero"]).metrics()


def run_bare(settings: Any, work: Path) -> dict[str, Any]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    sim = settings.simulation
    devices = list(range(settings.population.num_devices))
    walls, last = [], []
    adapted = done = 0
    work_cpu = 0.0
    with ProcessPoolExecutor(sim.workers, mp_context=mp.get_context("spawn"), initializer=_bare_init,
                             initargs=(settings.model_dump_json(), str(work / "store"))) as pool:
        for r in range(sim.rounds):
            t0 = time.perf_counter()
            now = sim.start_time_s + r * sim.round_interval_s
            results = list(pool.map(_bare_round, [(d, now) for d in devices]))
            walls.append(time.perf_counter() - t0)
            done += sum(int(m["status_code"]) == 0 for m in results)
            adapted += sum(int(m["adapted"]) for m in results)
            last = [m["rouge1"] for m in results]
            work_cpu += sum(_work_cpu(m) for m in results)
    return {"round_wall_s": walls, "device_rounds": done, "rouge1": last, "adapted": adapted, "work_cpu_s": work_cpu}


RUNNERS = {"fedasls": run_fedasls, "naive": run_naive, "bare": run_bare}


def run_variant_here(args: argparse.Namespace) -> None:
    """Internal: run one variant in this process and write its figures."""
    from fedasls.config import Settings

    settings = Settings.model_validate_json(Path(args.settings_file).read_text())
    with tempfile.TemporaryDirectory(prefix=f"fedasls-throughput-{args.variant}-") as work:
        t0 = time.perf_counter()
        result = RUNNERS[args.variant](settings, Path(work))
        result["inner_wall_s"] = time.perf_counter() - t0
    Path(args.result_file).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def measure(variant: str, settings_file: Path, out: Path) -> dict[str, Any]:
    """Run one variant in a child process; wall, process-tree CPU and load around it."""
    result_file = out / f"{variant}.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--variant", variant,
           "--settings-file", str(settings_file), "--result-file", str(result_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker process, as the ClientApp sets for torch
    load0, t0 = load_avg(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    with TreeCPU(proc.pid) as tree:
        output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode}):\n{output[-4000:]}")
    r = json.loads(result_file.read_text())
    steady_wall = sum(r["round_wall_s"][1:])
    rounds = len(r["round_wall_s"])
    per_round = r["device_rounds"] / max(rounds, 1)
    return {
        "variant": variant, "device_rounds": r["device_rounds"], "wall_s": wall, "cpu_s": tree.seconds,
        "rate": r["device_rounds"] / wall,
        "steady_rate": per_round * (rounds - 1) / steady_wall if rounds > 1 and steady_wall > 0 else float("nan"),
        "cpu_s_per_device_round": tree.seconds / max(r["device_rounds"], 1),
        "work_cpu_s": r["work_cpu_s"], "overhead_cpu_s": tree.seconds - r["work_cpu_s"],
        "round_wall_s": r["round_wall_s"], "rouge1": r["rouge1"], "adapted": r["adapted"],
        "load_before": load0, "load_after": load_avg(),
    }


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    from fedasls.stats import mean_ci

    print(f"\n{args.devices} devices x {args.rounds} rounds (days {args.start_day:g}..), {args.workers} workers, "
          f"config {Path(args.config).name} {' '.join(args.overrides)}")
    print(f"{'variant':<9}{'dev-rounds':>11}{'wall s':>9}{'rate/s':>9}{'steady/s':>10}{'CPU s':>9}{'work CPU':>10}"
          f"{'CPU s/dr':>10}{'load':>12}   ROUGE-1 last round [95% CI]")
    for v, r in rows.items():
        m, lo, hi = mean_ci(r["rouge1"])
        r["rouge1_mean"], r["rouge1_ci"] = m, [lo, hi]
        print(f"{v:<9}{r['device_rounds']:>11}{r['wall_s']:>9.1f}{r['rate']:>9.3f}{r['steady_rate']:>10.3f}"
              f"{r['cpu_s']:>9.1f}{r['work_cpu_s']:>10.1f}{r['cpu_s_per_device_round']:>10.2f}{r['load_before']:>6.1f}->{r['load_after']:<5.1f}"
              f"   {m:.3f} [{lo:.3f}, {hi:.3f}]")
    ratios: dict[str, float] = {}
    for other, target in (("naive", 5.0), ("bare", 0.8)):
        if "fedasls" in rows and other in rows:
            a, b = rows["fedasls"], rows[other]
            ratios[f"a/{other[0]}"] = a["rate"] / b["rate"]
            ratios[f"a/{other[0]}_steady"] = a["steady_rate"] / b["steady_rate"]
            ratios[f"a/{other[0]}_cpu"] = b["cpu_s_per_device_round"] / a["cpu_s_per_device_round"]
            ratios[f"a/{other[0]}_work_cpu"] = b["work_cpu_s"] / a["work_cpu_s"] if a["work_cpu_s"] else float("nan")
            print(f"fedasls/{other}: rate x{ratios[f'a/{other[0]}']:.2f} end to end, "
                  f"x{ratios[f'a/{other[0]}_steady']:.2f} steady, x{ratios[f'a/{other[0]}_cpu']:.2f} by CPU s per "
                  f"device round, x{ratios[f'a/{other[0]}_work_cpu']:.2f} by device-work CPU s (target >= {target:g})")
    return ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.variant:
        run_variant_here(args)
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = bench_settings(args)
    settings_file = out / "settings.json"
    settings_file.write_text(settings.model_dump_json())
    rows: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        print(f"running {variant} ...", flush=True)
        rows[variant] = measure(variant, settings_file, out)
    ratios = report(rows, args)
    summary = {
        "command": command_line("benchmarks.throughput", argv),
        "machine": machine(), "devices": args.devices, "rounds": args.rounds, "workers": args.workers,
        "start_day": args.start_day, "config": args.config, "overrides": args.overrides,
        "variants": rows, "ratios": ratios,
    }
    print(f"machine: {summary['machine']}")
    print(f"written: {write_json(out / 'throughput.json', summary)}")
    if args.save_baseline:
        print(f"baseline: {write_json(BASELINES / f'throughput-{args.save_baseline}.json', summary)}")
    return summary


if __name__ == "__main__":
    main()
