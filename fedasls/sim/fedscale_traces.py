"""FedScale device traces: capacity (compute, bandwidth) and behaviour (when a client is online).

`load_fedscale_traces` reads FedScale's pickles safely (plain containers and numbers only) and
validates every client; device i of a simulated population uses client i mod (number of clients).
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedasls.sim.availability import DailyAvailability


class FedScaleTraceError(ValueError):
    """A FedScale pickle is missing, unreadable or not in the expected shape."""


class _TraceUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numbers only: a trace file must not run code."""

    _ALLOWED = {
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "float"), ("builtins", "int"), ("collections", "OrderedDict"),
        ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: trace pickles may hold only dicts, lists and numbers")


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FedScaleTraceError(f"FedScale trace file not found: {path} (pass the path of an existing pickle)")
    try:
        with path.open("rb") as f:
            data = _TraceUnpickler(f).load()
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise FedScaleTraceError(f"{path}: not a readable FedScale pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not data:
        raise FedScaleTraceError(f"{path}: expected a non-empty dict {{client_id: {{...}}}}, got {type(data).__name__}")
    return data


def _number(path: Path, client: Any, key: str, value: Any, positive: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FedScaleTraceError(f"{path}: client {client!r} key '{key}' must be a number, got {value!r}") from None
    if not math.isfinite(x) or (positive and x <= 0) or x < 0:
        need = "> 0" if positive else ">= 0"
        raise FedScaleTraceError(f"{path}: client {client!r} key '{key}' must be finite and {need}, got {value!r}")
    return x


def _entry(path: Path, client: Any, entry: Any, keys: tuple[str, ...]) -> dict:
    if not isinstance(entry, dict):
        raise FedScaleTraceError(f"{path}: client {client!r} must map to a dict with keys {list(keys)}, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise FedScaleTraceError(f"{path}: client {client!r} is missing key '{key}' (expected keys {list(keys)})")
    return entry


def _behaviour_windows(path: Path, client: Any, entry: dict) -> DailyAvailability:
    entry = _entry(path, client, entry, ("active", "inactive", "finish_time"))
    period = _number(path, client, "finish_time", entry["finish_time"], positive=True)
    active, inactive = entry["active"], entry["inactive"]
    for key, seq in (("active", active), ("inactive", inactive)):
        if not isinstance(seq, (list, tuple)):
            raise FedScaleTraceError(f"{path}: client {client!r} key '{key}' must be a list of times, got {type(seq).__name__}")
    if len(active) not in (len(inactive), len(inactive) + 1):
        raise FedScaleTraceError(
            f"{path}: client {client!r} has {len(active)} 'active' but {len(inactive)} 'inactive' times "
            "(each active time needs a matching inactive time)"
        )
    ends = list(inactive) + ([period] if len(active) > len(inactive) else [])
    windows = []
    for a, b in zip(active, ends):
        s = min(_number(path, client, "active", a), period)
        e = min(_number(path, client, "inactive", b), period)
        if e < s:
            raise FedScaleTraceError(f"{path}: client {client!r} goes inactive at {b} before it becomes active at {a}")
        windows.append((s, e))
    return DailyAvailability(windows, period_s=period)


@dataclass
class FedScaleTraces:
    """FedScale device capacity and/or behaviour traces; device i maps to client i mod n."""

    capacity_clients: list[Any] = field(default_factory=list)
    computation_ms: list[float] = field(default_factory=list)
    communication_kbps: list[float] = field(default_factory=list)
    behavior_clients: list[Any] = field(default_factory=list)
    behavior: list[DailyAvailability] = field(default_factory=list)

    @property
    def median_computation_ms(self) -> float:
        return float(np.median(self.computation_ms)) if self.computation_ms else math.nan

    def capacity(self, device_id: int) -> tuple[Any, float, float] | None:
        """(client_id, relative compute speed, bandwidth Mbps) for a device, or None without capacity traces.

        Speed is relative to the file's median device (FedScale's "computation" is time per
        sample, so speed = median / computation); bandwidth converts kbps to Mbps.
        """
        if not self.capacity_clients:
            return None
        i = device_id % len(self.capacity_clients)
        return self.capacity_clients[i], self.median_computation_ms / self.computation_ms[i], self.communication_kbps[i] / 1000.0

    def availability(self, device_id: int) -> DailyAvailability | None:
        if not self.behavior:
            return None
        return self.behavior[device_id % len(self.behavior)]


def _sort_key(client: Any) -> tuple[int, Any]:
    return (0, client) if isinstance(client, (int, float)) else (1, str(client))


def load_fedscale_traces(capacity_path: str | Path | None, behavior_path: str | Path | None = None) -> FedScaleTraces:
    """Load FedScale pickles.

    capacity: `{client_id: {"computation": ms_per_sample, "communication": kbps}}`
    behavior: `{client_id: {"active": [t...], "inactive": [t...], "finish_time": t, ...}}`
    (a client is on in `[active[i], inactive[i])`, repeating every `finish_time` seconds).
    Clients are ordered by id; device i uses client i mod (number of clients).
    """
    if capacity_path is None and behavior_path is None:
        raise FedScaleTraceError("load_fedscale_traces needs a capacity_path, a behavior_path, or both")
    traces = FedScaleTraces()
    if capacity_path is not None:
        path = Path(capacity_path)
        data = _load_pickle(path)
        for client in sorted(data, key=_sort_key):
            entry = _entry(path, client, data[client], ("computation", "communication"))
            traces.capacity_clients.append(client)
            traces.computation_ms.append(_number(path, client, "computation", entry["computation"], positive=True))
            traces.communication_kbps.append(_number(path, client, "communication", entry["communication"], positive=True))
    if behavior_path is not None:
        path = Path(behavior_path)
        data = _load_pickle(path)
        for client in sorted(data, key=_sort_key):
            traces.behavior_clients.append(client)
            traces.behavior.append(_behaviour_windows(path, client, data[client]))
    return traces
