"""What a run's figures come from: the CPU model, cores, memory, threads, load and library versions.

Benchmarks (benchmarks/measure.py) and study reports (simulations/study.py) both record it, so two
sets of CPU seconds can be told apart when they come from different machines.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import psutil


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


LIBRARIES = ("torch", "transformers", "peft", "flwr", "ray")  # what a benchmark's machine record lists
COMPUTING = ("torch", "transformers", "peft")  # the libraries whose versions change a run's numbers


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions (None where a library is missing), read from package metadata: nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def environment() -> str:
    """What decides a run's numbers besides its settings, in one line: the CPU model and the versions of
    the libraries that compute (greedy answers and losses can differ where either does)."""
    versions = library_versions(COMPUTING)
    return "; ".join([cpu_model(), *(f"{name} {v or 'missing'}" for name, v in versions.items())])


def load_avg() -> float:
    """The 1-minute load average (how many runnable processes shared the cores)."""
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """The machine and software the figures come from."""
    import torch

    versions = {name: v for name, v in library_versions(LIBRARIES).items() if v is not None}  # missing: not listed
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(load_avg(), 2),
        **versions,
    }
