"""Per-stage wall and CPU time of a device round (numbers only, cheap enough to stay always on).

Code marks its stages with one line, and pays nothing when no timer is recording:

    from fedasls.device.timing import stage
    with stage("train"):
        ...

A caller records them with `record()`:

    with record() as timer:
        run_device_round(...)
    timer.seconds()  # {"train": StageTime(wall=..., cpu=..., calls=...), ...}

Stage times are *exclusive*: time spent in a stage nested inside another (e.g. "embed" inside
"catch_up") counts for the inner stage only, so the stages of one timer add up to the time
they cover and can be stacked in a bar. CPU time is this process's (`time.process_time`: all
its threads), which is what a busy, shared machine does not inflate. A `record()` inside
another adds its figures to the outer one when it ends, so a benchmark sees every round.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

from fedasls.recording import Recording

# The stages of a device round, in pipeline order (others may be added; these are reported first).
STAGES: tuple[str, ...] = (
    "load_state", "catch_up", "embed", "select", "feedback", "annotate", "split", "synthesize",
    "train", "gate", "evaluate", "save", "messaging", "worker_setup",
)


@dataclass
class StageTime:
    """Accumulated exclusive time of one stage."""

    wall: float = 0.0
    cpu: float = 0.0
    calls: int = 0

    def add(self, other: "StageTime") -> None:
        self.wall += other.wall
        self.cpu += other.cpu
        self.calls += other.calls


class StageTimer:
    """Accumulates exclusive wall and CPU seconds per stage name."""

    def __init__(self) -> None:
        self._times: dict[str, StageTime] = {}
        self._open: list[list[float]] = []  # per open stage: [wall, cpu] spent in its nested stages
        self._names: list[str] = []  # the open stages' names, innermost last

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name` (minus the stages nested in it)."""
        self._open.append([0.0, 0.0])
        self._names.append(name)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            nested_wall, nested_cpu = self._open.pop()
            self._names.pop()
            entry = self._times.setdefault(name, StageTime())
            entry.add(StageTime(wall - nested_wall, cpu - nested_cpu, 1))
            if self._open:  # the enclosing stage excludes this block's whole time
                self._open[-1][0] += wall
                self._open[-1][1] += cpu

    def innermost(self) -> str | None:
        """The name of the innermost open stage, or None."""
        return self._names[-1] if self._names else None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The block counts for no stage (a device thread waiting while a worker's batcher runs others);
        what it is owed comes back through `credit`."""
        self._open.append([0.0, 0.0])
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            self._open.pop()
            if self._open:
                self._open[-1][0] += wall
                self._open[-1][1] += cpu

    def credit(self, name: str, wall: float, cpu: float) -> None:
        """Add time spent elsewhere on this timer's behalf (its share of a batched call) to stage `name`."""
        self._times.setdefault(name, StageTime()).add(StageTime(wall, cpu, 0))

    def merge(self, other: "StageTimer") -> None:
        """Add another timer's figures to this one."""
        for name, value in other._times.items():
            self._times.setdefault(name, StageTime()).add(value)
        if self._open:  # a recording nested in one of our stages is excluded from that stage
            self._open[-1][0] += sum(v.wall for v in other._times.values())
            self._open[-1][1] += sum(v.cpu for v in other._times.values())

    def seconds(self) -> dict[str, StageTime]:
        """Stage -> accumulated time, known stages first in pipeline order, then the others."""
        order = [n for n in STAGES if n in self._times] + sorted(n for n in self._times if n not in STAGES)
        return {n: StageTime(self._times[n].wall, self._times[n].cpu, self._times[n].calls) for n in order}

    def metrics(self, prefix: str = "stage_") -> dict[str, float]:
        """Flat numbers for a reply: `<prefix><stage>_s` (wall) and `<prefix><stage>_cpu_s`, for every
        stage in STAGES (0.0 when it did not run, so every device reports the same keys) and any other."""
        out: dict[str, float] = {}
        times = {name: StageTime() for name in STAGES} | self.seconds()
        for name, t in times.items():
            out[f"{prefix}{name}_s"] = t.wall
            out[f"{prefix}{name}_cpu_s"] = t.cpu
        return out


_TIMERS: Recording[StageTimer] = Recording("fedasls_stage_timer", StageTimer, StageTimer.merge)
record = _TIMERS.record  # record the stages run inside the block into a new timer (merged into an enclosing one)


def stage(name: str) -> contextlib.AbstractContextManager[None]:
    """Time the block as stage `name` in the recording timer; a no-op when none records."""
    timer = _TIMERS.current()
    return contextlib.nullcontext() if timer is None else timer.stage(name)


def current() -> StageTimer | None:
    """The timer recording now, if any."""
    return _TIMERS.current()
