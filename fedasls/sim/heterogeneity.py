"""Device heterogeneity: tiers and the per-device profiles drawn from them.

Every simulated device gets a `DeviceProfile` (compute speed, bandwidth, the LoRA rank its
memory allows, the buffer its storage allows, a dropout probability and a daily availability
pattern). Profiles are generated lazily and deterministically from `(seed, device_id)`, so
generating one costs the same for a population of ten or ten million.

Optionally, compute speed, bandwidth and availability come from FedScale traces
(`fedasls.sim.fedscale_traces`). Availability windows live in `fedasls.sim.availability`; the cost
model that turns a device's work into simulated seconds in `fedasls.sim.cost_model`.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedasls.sim.availability import DailyAvailability, diurnal_availability
from fedasls.sim.fedscale_traces import load_fedscale_traces

# Memory (MB) -> the largest LoRA rank a device trains: below 4 GB rank 4, below 8 GB rank 8, else 16.
RANK_BY_MEMORY_MB: tuple[tuple[float, int], ...] = ((4096.0, 4), (8192.0, 8), (math.inf, 16))
# Storage set aside for personalization (MB) -> selection-buffer bytes: `selection.buffer_bytes` is the budget of
# a device with REFERENCE_STORAGE_MB (the mid tier); others scale with their storage (default 16 KiB:
# 16 MB -> 8 KiB, 32 MB -> 16 KiB, 64 MB -> 32 KiB).
REFERENCE_STORAGE_MB = 32.0
DEFAULT_BUFFER_BYTES = 16_384
BUFFER_BYTES_QUANTUM = 256


class HeterogeneityError(ValueError):
    """Invalid heterogeneity input (tier mix, dropout scale, device id); the message names it and the fix."""


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


def buffer_bytes_for_storage(storage_mb: float, reference_bytes: int) -> int:
    """Selection-buffer budget for `storage_mb` of storage: `reference_bytes` (selection.buffer_bytes)
    scaled by storage_mb / REFERENCE_STORAGE_MB, rounded down to 256 bytes (min 256)."""
    raw = int(storage_mb * reference_bytes / REFERENCE_STORAGE_MB)
    return max(BUFFER_BYTES_QUANTUM, raw // BUFFER_BYTES_QUANTUM * BUFFER_BYTES_QUANTUM)


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
# Settings and the model
# ----------------------------------------------------------------------------------------------


class HeterogeneitySettings(BaseModel):
    """Device heterogeneity: tier mix, optional FedScale traces, dropout and availability."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf / nan: refused

    seed: int = Field(0, description="Seed of the device profiles (tier, jitter, availability).")
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
