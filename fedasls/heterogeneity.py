"""Device heterogeneity: tiers, per-device profiles, availability, and the cost model.

Every simulated device gets a `DeviceProfile` (compute speed, bandwidth, the LoRA rank its
memory allows, the buffer its storage allows, a dropout probability and a daily availability
pattern). Profiles are generated lazily and deterministically from `(seed, device_id)`, so
generating one costs the same for a population of ten or ten million.

Optionally, compute speed, bandwidth and availability come from FedScale traces
(`load_fedscale_traces`). The `CostModel` turns a device's work into simulated seconds for
the coordinator's virtual clock.
"""

from __future__ import annotations

import bisect
import functools
import math
import pickle
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

DAY_SECONDS = 86_400.0
HOUR = 3_600.0

# Memory (MB) -> the largest LoRA rank a device trains: below 4 GB rank 4, below 8 GB rank 8, else 16.
RANK_BY_MEMORY_MB: tuple[tuple[float, int], ...] = ((4096.0, 4), (8192.0, 8), (math.inf, 16))
# Storage set aside for personalization (MB) -> selection-buffer bytes: `selection.buffer_bytes` is the budget of
# a device with REFERENCE_STORAGE_MB (the mid tier); others scale with their storage (default 16 KiB:
# 16 MB -> 8 KiB, 32 MB -> 16 KiB, 64 MB -> 32 KiB).
REFERENCE_STORAGE_MB = 32.0
DEFAULT_BUFFER_BYTES = 16_384
BUFFER_BYTES_QUANTUM = 256


class HeterogeneityError(ValueError):
    """Invalid heterogeneity input (tier mix, trace file); the message names it and the fix."""


@dataclass(frozen=True)
class DeviceTier:
    """A class of phones. `compute_speed` is a relative training-throughput multiplier
    (1.0 = the cost model's reference device); `share` is its default share of the fleet."""

    name: str
    compute_speed: float
    bandwidth_mbps: float
    memory_mb: float
    storage_mb: float
    share: float
    dropout_prob: float = 0.05


DEFAULT_TIERS: dict[str, DeviceTier] = {
    "low": DeviceTier("low", compute_speed=0.5, bandwidth_mbps=5.0, memory_mb=3072, storage_mb=16, share=0.3, dropout_prob=0.10),
    "mid": DeviceTier("mid", compute_speed=1.0, bandwidth_mbps=20.0, memory_mb=6144, storage_mb=32, share=0.5, dropout_prob=0.05),
    "high": DeviceTier("high", compute_speed=2.0, bandwidth_mbps=50.0, memory_mb=12288, storage_mb=64, share=0.2, dropout_prob=0.02),
}


def lora_rank_for_memory(memory_mb: float) -> int:
    """The largest LoRA rank a device with `memory_mb` of memory trains (RANK_BY_MEMORY_MB)."""
    for limit, rank in RANK_BY_MEMORY_MB:
        if memory_mb < limit:
            return rank
    return RANK_BY_MEMORY_MB[-1][1]


def buffer_bytes_for_storage(storage_mb: float, reference_bytes: int = DEFAULT_BUFFER_BYTES) -> int:
    """Selection-buffer budget for `storage_mb` of storage: `reference_bytes` (selection.buffer_bytes)
    scaled by storage_mb / REFERENCE_STORAGE_MB, rounded down to 256 bytes (min 256)."""
    raw = int(storage_mb * reference_bytes / REFERENCE_STORAGE_MB)
    return max(BUFFER_BYTES_QUANTUM, raw // BUFFER_BYTES_QUANTUM * BUFFER_BYTES_QUANTUM)


class DailyAvailability:
    """On/off windows repeating with a period (a 24 h day by default).

    `windows` are half-open `[start, end)` seconds; on construction they may wrap past the
    period (e.g. charging 22:00 -> 06:00) and overlap: they are folded into `[0, period)`,
    split at the period boundary and merged.
    """

    def __init__(self, windows: list[tuple[float, float]] | tuple[tuple[float, float], ...] = (), period_s: float = DAY_SECONDS):
        if not period_s > 0:
            raise HeterogeneityError(f"availability period_s must be > 0, got {period_s}")
        pieces: list[tuple[float, float]] = []
        for start, end in windows:
            start, end = float(start), float(end)
            if not end >= start:
                raise HeterogeneityError(f"availability window ({start}, {end}) ends before it starts")
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


@dataclass(frozen=True)
class DeviceProfile:
    """One device's capabilities, derived from its tier (or a FedScale trace) plus jitter."""

    device_id: int
    tier: str
    compute_speed: float
    bandwidth_mbps: float
    max_lora_rank: int
    dropout_prob: float
    availability: DailyAvailability
    memory_mb: float = 0.0
    storage_mb: float = REFERENCE_STORAGE_MB

    def buffer_bytes(self, reference_bytes: int) -> int:
        """This device's selection-buffer budget when a mid-tier device has `reference_bytes`
        (selection.buffer_bytes; no default, so a caller cannot drop the setting by omission)."""
        return buffer_bytes_for_storage(self.storage_mb, reference_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["availability"] = self.availability.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceProfile":
        return cls(**{**data, "availability": DailyAvailability.from_dict(data["availability"])})


# ----------------------------------------------------------------------------------------------
# FedScale traces
# ----------------------------------------------------------------------------------------------


class FedScaleTraceError(HeterogeneityError):
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


# ----------------------------------------------------------------------------------------------
# Settings and the model
# ----------------------------------------------------------------------------------------------


class HeterogeneitySettings(BaseModel):
    """Device heterogeneity: tier mix, optional FedScale traces, dropout and availability."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 0
    tier_mix: dict[str, float] | None = Field(None, description="Share per tier name (low/mid/high); None = default mix.")
    fedscale_capacity: str | None = Field(None, description="FedScale device-capacity pickle (compute ms/sample, kbps).")
    fedscale_behavior: str | None = Field(None, description="FedScale behaviour-trace pickle (active/inactive times).")
    dropout_scale: float = Field(1.0, ge=0, description="Multiplies every tier's per-round dropout probability.")
    availability: Literal["diurnal", "always"] = Field("diurnal", description="Generated availability when no behaviour trace is given.")

    @field_validator("tier_mix")
    @classmethod
    def _check_mix(cls, mix: dict[str, float] | None) -> dict[str, float] | None:
        if mix is not None:
            _normalise_mix(mix, DEFAULT_TIERS)
        return mix


def _normalise_mix(mix: dict[str, float], tiers: dict[str, DeviceTier]) -> dict[str, float]:
    unknown = sorted(set(mix) - set(tiers))
    if unknown:
        raise HeterogeneityError(f"tier_mix names unknown tier(s) {unknown}; known tiers are {sorted(tiers)}")
    bad = {k: v for k, v in mix.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise HeterogeneityError(f"tier_mix shares must be finite numbers >= 0, got {bad}")
    total = float(sum(mix.values()))
    if total <= 0:
        raise HeterogeneityError(f"tier_mix shares must sum to > 0, got {mix}")
    return {name: float(mix.get(name, 0.0)) / total for name in tiers}


def device_uniforms(seed: int, device_id: int, n: int = 16) -> list[float]:
    """`n` uniforms in (0, 1) from SeedSequence([seed, device_id]) (no Generator: cheaper per device)."""
    words = np.random.SeedSequence([seed, device_id]).generate_state(n).tolist()  # uint32
    return [(w + 0.5) * 2.0**-32 for w in words]


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


class HeterogeneityModel:
    """Lazily generates deterministic `DeviceProfile`s from `(seed, device_id)`.

    Tier is drawn from `tier_mix`; speed and bandwidth get log-normal jitter, memory and
    storage +-10 % uniform jitter. All draws come from `device_uniforms(seed, device_id)`. With FedScale capacity traces, speed and bandwidth come
    from the trace and the tier is the one whose speed is nearest (in log scale); with
    behaviour traces, availability comes from the trace.
    """

    SPEED_JITTER = 0.15
    BANDWIDTH_JITTER = 0.30
    SIZE_JITTER = 0.10

    def __init__(
        self,
        seed: int = 0,
        tier_mix: dict[str, float] | None = None,
        fedscale_path: str | Path | None = None,
        fedscale_behavior_path: str | Path | None = None,
        dropout_scale: float = 1.0,
        availability: Literal["diurnal", "always"] = "diurnal",
        tiers: dict[str, DeviceTier] | None = None,
        cache_size: int = 16_384,
    ):
        self.seed = int(seed)
        self.tiers = dict(tiers or DEFAULT_TIERS)
        self.tier_mix = _normalise_mix(tier_mix if tier_mix is not None else {n: t.share for n, t in self.tiers.items()}, self.tiers)
        if dropout_scale < 0:
            raise HeterogeneityError(f"dropout_scale must be >= 0, got {dropout_scale}")
        if availability not in ("diurnal", "always"):
            raise HeterogeneityError(f"availability must be 'diurnal' or 'always', got {availability!r}")
        self.dropout_scale = float(dropout_scale)
        self.availability_mode = availability
        self.traces = (
            load_fedscale_traces(fedscale_path, fedscale_behavior_path)
            if fedscale_path is not None or fedscale_behavior_path is not None
            else None
        )
        self._names = list(self.tiers)
        self._cum = np.cumsum([self.tier_mix[n] for n in self._names]).tolist()
        self.cache_size = cache_size
        self.profile = functools.lru_cache(maxsize=cache_size)(self._make_profile)

    def __getstate__(self) -> dict[str, Any]:  # picklable (e.g. for Ray workers): drop the cache
        state = dict(self.__dict__)
        del state["profile"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.profile = functools.lru_cache(maxsize=self.cache_size)(self._make_profile)

    @classmethod
    def from_settings(cls, settings: HeterogeneitySettings) -> "HeterogeneityModel":
        return cls(
            seed=settings.seed,
            tier_mix=settings.tier_mix,
            fedscale_path=settings.fedscale_capacity,
            fedscale_behavior_path=settings.fedscale_behavior,
            dropout_scale=settings.dropout_scale,
            availability=settings.availability,
        )

    def _nearest_tier(self, speed: float) -> DeviceTier:
        return min(self.tiers.values(), key=lambda t: abs(math.log(t.compute_speed) - math.log(speed)))

    def _make_profile(self, device_id: int) -> DeviceProfile:
        if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)) or device_id < 0:
            raise HeterogeneityError(f"device_id must be an integer >= 0, got {device_id!r}")
        device_id = int(device_id)
        u = device_uniforms(self.seed, device_id)  # fixed slots: 0 tier, 1-2 speed/bandwidth, 3-4 sizes, 5-13 availability
        tier = self.tiers[self._names[min(bisect.bisect_right(self._cum, u[0]), len(self._names) - 1)]]
        speed = tier.compute_speed * math.exp(self.SPEED_JITTER * _STD_NORMAL.inv_cdf(u[1]))
        bandwidth = tier.bandwidth_mbps * math.exp(self.BANDWIDTH_JITTER * _STD_NORMAL.inv_cdf(u[2]))
        availability = DailyAvailability.always() if self.availability_mode == "always" else diurnal_availability(u[5:14])
        if self.traces is not None:
            cap = self.traces.capacity(device_id)
            if cap is not None:
                _, speed, bandwidth = cap
                tier = self._nearest_tier(speed)
            trace_availability = self.traces.availability(device_id)
            if trace_availability is not None:
                availability = trace_availability
        memory = tier.memory_mb * (1 - self.SIZE_JITTER + 2 * self.SIZE_JITTER * u[3])
        storage = tier.storage_mb * (1 - self.SIZE_JITTER + 2 * self.SIZE_JITTER * u[4])
        return DeviceProfile(
            device_id=device_id,
            tier=tier.name,
            compute_speed=speed,
            bandwidth_mbps=bandwidth,
            max_lora_rank=lora_rank_for_memory(memory),
            dropout_prob=min(1.0, tier.dropout_prob * self.dropout_scale),
            availability=availability,
            memory_mb=memory,
            storage_mb=storage,
        )


# ----------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostConstants:
    """Every constant of the linear cost model, for a reference device (compute_speed 1.0).

    train:    n_examples * epochs * train_s_per_example * (1 + rank_overhead * rank) / speed
    embed:    n_items * embed_s_per_item / speed
    eval:     n_items * eval_s_per_item / speed      (generating one answer per item)
    download: latency_s + 8 * bytes / (bandwidth_mbps * 1e6)
    upload:   latency_s + 8 * bytes / (bandwidth_mbps * 1e6 * upload_fraction)
    (a transfer of 0 bytes costs nothing.)
    """

    train_s_per_example: float = 0.08
    rank_overhead: float = 0.01
    embed_s_per_item: float = 0.02
    eval_s_per_item: float = 0.25
    upload_fraction: float = 0.5
    latency_s: float = 0.1


WORK_KEYS = ("train_examples", "epochs", "rank", "embed_items", "eval_items", "upload_bytes", "download_bytes")


def _non_negative(name: str, value: float) -> float:
    if not (isinstance(value, (int, float, np.integer, np.floating)) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class CostModel:
    """Simulated seconds a device spends on its work (see `CostConstants`)."""

    def __init__(self, constants: CostConstants | None = None):
        self.c = constants or CostConstants()

    def train_seconds(self, profile: DeviceProfile, n_examples: int, epochs: int = 1, rank: int | None = None) -> float:
        r = profile.max_lora_rank if rank is None else _non_negative("rank", rank)
        work = _non_negative("n_examples", n_examples) * _non_negative("epochs", epochs)
        return work * self.c.train_s_per_example * (1.0 + self.c.rank_overhead * r) / profile.compute_speed

    def embed_seconds(self, profile: DeviceProfile, n_items: int) -> float:
        return _non_negative("n_items", n_items) * self.c.embed_s_per_item / profile.compute_speed

    def eval_seconds(self, profile: DeviceProfile, n_items: int) -> float:
        return _non_negative("n_items", n_items) * self.c.eval_s_per_item / profile.compute_speed

    def download_seconds(self, profile: DeviceProfile, n_bytes: int) -> float:
        n = _non_negative("n_bytes", n_bytes)
        return 0.0 if n == 0 else self.c.latency_s + 8.0 * n / (profile.bandwidth_mbps * 1e6)

    def upload_seconds(self, profile: DeviceProfile, n_bytes: int) -> float:
        n = _non_negative("n_bytes", n_bytes)
        return 0.0 if n == 0 else self.c.latency_s + 8.0 * n / (profile.bandwidth_mbps * 1e6 * self.c.upload_fraction)

    def round_seconds(self, profile: DeviceProfile, work: dict[str, float]) -> float:
        """Total seconds for one round's `work` (keys from WORK_KEYS; missing keys count 0,
        `epochs` defaults to 1 and `rank` to the device's max_lora_rank)."""
        unknown = sorted(set(work) - set(WORK_KEYS))
        if unknown:
            raise ValueError(f"unknown work key(s) {unknown}; allowed keys are {list(WORK_KEYS)}")
        return (
            self.download_seconds(profile, work.get("download_bytes", 0))
            + self.embed_seconds(profile, work.get("embed_items", 0))
            + self.train_seconds(profile, work.get("train_examples", 0), work.get("epochs", 1), work.get("rank"))
            + self.eval_seconds(profile, work.get("eval_items", 0))
            + self.upload_seconds(profile, work.get("upload_bytes", 0))
        )
