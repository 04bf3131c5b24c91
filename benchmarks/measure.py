"""Honest figures for benchmarks on a shared machine: wall AND CPU time, with the load next to them.

- `Meter`: wall seconds, this process's CPU seconds, its waited-for children's CPU seconds, the
  1-minute load average before and after.
- `TreeCPU`: CPU seconds of a process and all its descendants (Ray workers included), sampled
  in a thread, so processes that exit before the end still count up to their last sample.
- `machine()`: what ran the benchmark (CPU model, cores, memory, library versions, threads).
- `matmul_flops()`: float32 matmul FLOP/s of torch on this process's threads, for efficiency ratios.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "benchmarks" / "baselines"  # committed figures (benchmarks/results/ is git-ignored)


def load_avg() -> float:
    """The 1-minute load average (how many runnable processes shared the cores)."""
    return os.getloadavg()[0]


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

    def _sample(self) -> None:
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
            self._sample()

    def __enter__(self) -> "TreeCPU":
        self._sample()
        self._base_own, self._base_reaped = dict(self._own), dict(self._reaped)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sample()
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


def machine() -> dict[str, Any]:
    """The machine and software the figures come from."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "flwr", "ray"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a missing optional library is simply not listed
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(load_avg(), 2),
        **versions,
    }


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
