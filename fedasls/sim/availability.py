"""When a simulated device is online: on/off windows repeating every day (or a trace's period).

`DailyAvailability` holds the windows and answers "is it on now?" and "when does that change?";
`diurnal_availability` draws the default pattern (charging overnight plus a few short daytime
windows) from a device's uniforms, so a profile costs the same in a fleet of any size.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

DAY_SECONDS = 86_400.0
HOUR = 3_600.0


class AvailabilityError(ValueError):
    """An availability window or period that cannot be; the message names it."""


class DailyAvailability:
    """On/off windows repeating with a period (a 24 h day by default).

    `windows` are half-open `[start, end)` seconds; on construction they may wrap past the
    period (e.g. charging 22:00 -> 06:00) and overlap: they are folded into `[0, period)`,
    split at the period boundary and merged.
    """

    def __init__(self, windows: list[tuple[float, float]] | tuple[tuple[float, float], ...] = (), period_s: float = DAY_SECONDS):
        if not period_s > 0:
            raise AvailabilityError(f"availability period_s must be > 0, got {period_s}")
        pieces: list[tuple[float, float]] = []
        for start, end in windows:
            start, end = float(start), float(end)
            if not end >= start:
                raise AvailabilityError(f"availability window ({start}, {end}) ends before it starts")
            if end - start >= period_s:
                pieces = [(0.0, period_s)]
                break
            s = start % period_s
            e = s + (end - start)
            if e <= period_s:
                pieces.append((s, e))
            else:
                pieces.extend([(s, period_s), (0.0, e - period_s)])
        merged: list[list[float]] = []
        for s, e in sorted(p for p in pieces if p[1] > p[0]):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.period_s = float(period_s)
        self.windows: tuple[tuple[float, float], ...] = tuple((s, e) for s, e in merged)
        self._starts = [s for s, _ in self.windows]
        flips = {s for s, _ in self.windows} | {e % self.period_s for _, e in self.windows}
        wraps = bool(self.windows) and self.windows[0][0] == 0.0 and self.windows[-1][1] == self.period_s
        if wraps:  # on across the period boundary: 0 is not a change
            flips.discard(0.0)
        self._flips = sorted(flips)

    @classmethod
    def always(cls, period_s: float = DAY_SECONDS) -> "DailyAvailability":
        return cls([(0.0, period_s)], period_s)

    def is_available(self, t_seconds: float) -> bool:
        """Whether the device is on at absolute time `t_seconds` (taken modulo the period)."""
        tod = t_seconds % self.period_s
        i = bisect.bisect_right(self._starts, tod) - 1
        return i >= 0 and tod < self.windows[i][1]

    def next_change(self, t_seconds: float) -> float:
        """The first absolute time > `t_seconds` at which availability flips (inf if never)."""
        if not self._flips:
            return math.inf
        tod = t_seconds % self.period_s
        base = t_seconds - tod
        i = bisect.bisect_right(self._flips, tod)
        if i < len(self._flips):
            return base + self._flips[i]
        return base + self.period_s + self._flips[0]

    def available_fraction(self) -> float:
        return sum(e - s for s, e in self.windows) / self.period_s

    def to_dict(self) -> dict[str, Any]:
        return {"period_s": self.period_s, "windows": [list(w) for w in self.windows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DailyAvailability":
        return cls([tuple(w) for w in data["windows"]], data.get("period_s", DAY_SECONDS))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DailyAvailability) and (self.period_s, self.windows) == (other.period_s, other.windows)

    def __repr__(self) -> str:
        return f"DailyAvailability(windows={self.windows!r}, period_s={self.period_s})"


_STD_NORMAL = NormalDist()


def diurnal_availability(u: Sequence[float]) -> DailyAvailability:
    """Charging overnight (start ~22:00 +- 1 h, 6-9 h long) plus 1-3 short daytime windows
    (start 07:00-21:00, 15-90 min long), from 9 uniforms in (0, 1)."""
    night_start = min(max(22.0 + _STD_NORMAL.inv_cdf(u[0]), 19.0), 25.0) * HOUR
    windows = [(night_start, night_start + (6.0 + 3.0 * u[1]) * HOUR)]
    for k in range(1 + int(3 * u[2])):
        start = (7.0 + 14.0 * u[3 + 2 * k]) * HOUR
        windows.append((start, start + (0.25 + 1.25 * u[4 + 2 * k]) * HOUR))
    return DailyAvailability(windows)
