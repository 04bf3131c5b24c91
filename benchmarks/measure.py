"""What every benchmark shares: its command line, its settings, its output files, honest figures.

- `parser()` / `add_run_arguments()`: `--config` (a shipped scenario name or a TOML file), `--set
  SECTION.KEY=VALUE` (repeatable), `--model` (a preset name or a local Hugging Face folder), `--out`.
- `load_run_settings()`: the scenario, the benchmark's own overrides, `--model`, then `--set` (the
  user's overrides win), with the model built or converted once and resolved to its folder.
- `Study` / `study_settings()`: a study is a base scenario plus named lists of `--set` overrides.
- `write_json()`, `write_rows()` (CSV), `command_line()`: what a run writes and the command that made it.
- `Meter`: wall seconds, this process's CPU seconds, its waited-for children's CPU seconds, the
  1-minute load average before and after.
- `TreeCPU`: CPU seconds of a process and all its descendants (Ray workers included), sampled
  in a thread, so processes that exit before the end still count up to their last sample.
- `machine()` (from simulations/machine.py): what ran the benchmark (CPU model, cores, memory, library
  versions, threads).
- `matmul_flops()`: float32 matmul FLOP/s of torch on this process's threads, for efficiency ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from simulations.machine import load_avg, machine  # noqa: F401 (the benchmarks' machine record)

if TYPE_CHECKING:
    from fedasls.config import Settings

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "benchmarks" / "baselines"  # committed figures (benchmarks/results/ is git-ignored)
RESULTS = REPO / "benchmarks" / "results"  # where a benchmark writes unless --out says otherwise (git-ignored)

Study = dict[str, list[str]]  # variant name -> its --set overrides of the base scenario


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the benchmark's module docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_arguments(p: argparse.ArgumentParser, *, out: str, config: str | None = "quickstart",
                      model: str | None = None, with_model: bool = True) -> None:
    """--config, --set, --model and --out, the same in every benchmark."""
    p.add_argument("--config", default=config, help=f"a shipped scenario name or a TOML file (default: "
                   f"{config or 'the built-in defaults'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set adaptation.fused_adamw=false (repeatable; wins over the "
                   "benchmark's own overrides)")
    if with_model:
        p.add_argument("--model", default=model, help="a model preset (smollm2-135m-instruct) or a local Hugging "
                       f"Face causal-LM folder (default: {model or 'the scenario model'})")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="where the model runs (model.device); cuda also reserves a GPU share per worker "
                   "(simulation.gpus_per_worker, default 1 / workers unless --set). Default: the scenario's (cpu)")
    p.add_argument("--out", default=out, help=f"where results go (default {out})")


def device_overrides(device: str | None, workers: int = 1) -> list[str]:
    """--device as settings; a CUDA request on a machine without a GPU ends here with the reason."""
    if device is None:
        return []
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise SystemExit(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device on this "
                             "machine, so there is nothing to benchmark on a GPU here. Run it on a GPU machine, or "
                             "use --device cpu / auto.")
    share = [f"simulation.gpus_per_worker={1.0 / max(workers, 1):.4g}"] if device != "cpu" else []
    return [f'model.device="{device}"', *share]


def config_path(config: str | None) -> Path | None:
    """The TOML file of a --config value (a file, or a shipped scenario's name); None = built-in defaults."""
    from fedasls.scenarios import scenario_path

    return scenario_path(config) if config else None


def run_overrides(args: argparse.Namespace, extra: Sequence[str] = ()) -> list[str]:
    """The benchmark's own overrides, then --model, then the user's --set (later ones win)."""
    from fedasls.lm.presets import model_override

    model = getattr(args, "model", None)
    device = device_overrides(getattr(args, "device", None), int(getattr(args, "workers", None) or 1))
    return [*extra, *([model_override(model)] if model else []), *device, *args.overrides]


def load_run_settings(args: argparse.Namespace, extra: Sequence[str] = ()) -> "Settings":
    """The run's settings (`run_overrides` on --config), the model built or converted and resolved to its folder."""
    from fedasls.config import load_settings
    from fedasls.lm.model import ensure_model

    settings = load_settings(config_path(args.config), run_overrides(args, extra))
    return settings.model_copy(update={"model": settings.model.at_path(ensure_model(settings.model))})


def study_settings(args: argparse.Namespace, study: Study, extra: Sequence[str] = ()) -> dict[str, "Settings"]:
    """Each variant's settings: the run's overrides (`run_overrides`), then the variant's own."""
    from fedasls.config import load_settings
    from fedasls.lm.model import ensure_model

    out = {}
    for name, overrides in study.items():
        settings = load_settings(config_path(args.config), [*run_overrides(args, extra), *overrides])
        out[name] = settings.model_copy(update={"model": settings.model.at_path(ensure_model(settings.model))})
    return out


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that ran benchmark `module` (e.g. "benchmarks.throughput"), for its summary file."""
    return " ".join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])


@dataclass
class Meter:
    """Wall and CPU seconds of a block: `with Meter() as m: ...; m.wall, m.cpu, m.children_cpu`."""

    wall: float = 0.0
    cpu: float = 0.0  # this process, all threads
    children_cpu: float = 0.0  # terminated, waited-for child processes
    load_before: float = 0.0
    load_after: float = 0.0
    _start: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def __enter__(self) -> "Meter":
        self.load_before = load_avg()
        self._start = (time.perf_counter(), time.process_time(), _children_cpu())
        return self

    def __exit__(self, *exc: Any) -> None:
        wall0, cpu0, child0 = self._start
        self.wall = time.perf_counter() - wall0
        self.cpu = time.process_time() - cpu0
        self.children_cpu = _children_cpu() - child0
        self.load_after = load_avg()

    def figures(self) -> dict[str, float]:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "children_cpu_s": self.children_cpu,
                "load_before": self.load_before, "load_after": self.load_after}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class TreeCPU:
    """CPU seconds of process `pid` (default: this one) and every descendant, sampled every `period` s.

    Each process counts its own user + system time as last sampled. A reaped child's time also lands
    in its parent's children_* times; of that, only what was never sampled counts (short-lived
    children, the tail after the last sample), so no process is counted twice.
    """

    def __init__(self, pid: int | None = None, period: float = 0.25) -> None:
        self.root = psutil.Process(pid or os.getpid())
        self.period = period
        self._own: dict[tuple[int, float], float] = {}  # process -> own user + system
        self._reaped: dict[tuple[int, float], float] = {}  # process -> children_user + children_system
        self._parent: dict[tuple[int, float], tuple[int, float] | None] = {}
        self._alive: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Record every process of the tree now (the thread calls this every `period` seconds)."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        keys = {}
        for p in procs:
            try:
                keys[p.pid] = (p.pid, p.create_time())
            except psutil.Error:
                pass
        alive = set()
        for p in procs:
            try:
                t = p.cpu_times()
                key = keys[p.pid]
                self._own[key], self._reaped[key] = t.user + t.system, t.children_user + t.children_system
                self._parent.setdefault(key, keys.get(p.ppid()))
                alive.add(key)
            except (psutil.Error, KeyError):
                pass
        self._alive = alive

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self) -> "TreeCPU":
        self.sample()
        self._base_own, self._base_reaped = dict(self._own), dict(self._reaped)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        """CPU seconds used inside the block by the tree (processes alive at start count from there)."""
        own = sum(v - self._base_own.get(k, 0.0) for k, v in self._own.items())
        unseen = 0.0
        for key, reaped in self._reaped.items():
            gone = [c for c, parent in self._parent.items() if parent == key and c not in self._alive]
            seen = sum(self._own[c] + self._reaped[c] for c in gone)  # already counted above (and below)
            unseen += max(0.0, reaped - self._base_reaped.get(key, 0.0) - seen)
        return own + unseen


def matmul_flops(n: int = 512, m: int | None = None, k: int | None = None, seconds: float = 1.0) -> float:
    """float32 FLOP/s of torch.matmul of [n, k] x [k, m] (square when m, k are None) on the current
    threads, measured by CPU time (not inflated by other processes sharing the cores)."""
    import torch

    m = m or n
    k = k or n
    a, b = torch.randn(n, k), torch.randn(k, m)
    torch.matmul(a, b)  # warm-up
    reps, cpu0 = 0, time.process_time()
    while time.process_time() - cpu0 < seconds:
        torch.matmul(a, b)
        reps += 1
    return 2.0 * n * m * k * reps / (time.process_time() - cpu0)


def write_json(path: Path, data: Any) -> Path:
    """`data` as indented JSON (dataclasses and paths included), folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    return path


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as a CSV with a header (the union of their keys), folders made as needed."""
    from simulations.report import write_csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, rows)
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
