"""The one driver of a device's stream: observe up to a time, check the trigger, adapt.

Every caller that moves a device along its stream (the fleet's device round, `fedasls device`,
the selection ablation) goes through `advance`, so they all apply the same rules:

    for each chunk of `check_every` new interactions (all of them at once if None):
        observe the chunk (profile + bounded-buffer selection)
        if the adaptive trigger fires: adapt (the device's safe adaptation step)

The trigger is checked at least once, even when nothing new arrived.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedasls.device.device import AdaptReport, Device

ChunkCallback = Callable[[int, "AdaptReport | None"], None]


@dataclass
class Advance:
    """What one `advance` call did."""

    new_interactions: int = 0
    adaptations: list[AdaptReport] = field(default_factory=list)
    observe_seconds: float = 0.0  # wall time spent observing (embedding, profile, selection)

    @property
    def examples(self) -> int:
        """Training examples over all adaptations of this call."""
        return sum(r.examples for r in self.adaptations)


def advance(
    device: Device,
    until: float | None = None,
    *,
    check_every: int | None = None,
    stream_embeddings: np.ndarray | None = None,
    on_chunk: ChunkCallback | None = None,
) -> Advance:
    """Advance `device` through its stream up to virtual time `until` (the whole stream if None).

    `check_every`: interactions observed between trigger checks (None: one check after all).
    `stream_embeddings`: precomputed selection embeddings, one row per interaction of the whole
    stream. `on_chunk(n_observed, report_or_None)` is called after each chunk (progress bars).
    """
    if check_every is not None and check_every < 1:
        raise ValueError(f"advance: check_every must be >= 1 or None, got {check_every}")
    out = Advance()
    total = len(device.pending(until))
    step = check_every or max(total, 1)
    remaining = total
    while True:
        t0 = time.perf_counter()
        n = device.catch_up(until, limit=min(step, remaining), stream_embeddings=stream_embeddings)
        out.observe_seconds += time.perf_counter() - t0
        remaining -= n
        out.new_interactions += n
        report = device.adapt() if device.should_adapt() else None
        if report is not None:
            out.adaptations.append(report)
        if on_chunk is not None:
            on_chunk(n, report)
        if remaining <= 0:
            return out
