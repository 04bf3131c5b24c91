"""The linear cost model: simulated seconds a device spends on a round's work.

Used only by simulations (`fedasls.sim.simulated_timing`): a device reports its work in these units
(`WORK_KEYS`), and the cost model with the device's profile turns it into seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fedasls.sim.heterogeneity import DeviceProfile


class CostConstants(BaseModel):
    """[cost]: every constant of the linear cost model, for a reference device (compute_speed 1.0).

    train:    n_examples * epochs * train_s_per_example * (1 + rank_overhead * rank) / speed
    embed:    n_items * embed_s_per_item / speed
    eval:     n_items * eval_s_per_item / speed      (generating one answer per item)
    download: latency_s + 8 * bytes / (bandwidth_mbps * 1e6)
    upload:   latency_s + 8 * bytes / (bandwidth_mbps * 1e6 * upload_fraction)
    (a transfer of 0 bytes costs nothing.)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_s_per_example: float = Field(0.08, ge=0, description="Simulated seconds per training example and epoch.")
    rank_overhead: float = Field(0.01, ge=0, description="Extra training cost per LoRA rank (share of the rank-0 cost).")
    embed_s_per_item: float = Field(0.02, ge=0, description="Simulated seconds to embed one new interaction.")
    eval_s_per_item: float = Field(0.25, ge=0, description="Simulated seconds to answer and score one held-out item.")
    upload_fraction: float = Field(0.5, gt=0, le=1, description="Upload bandwidth as a share of the download bandwidth.")
    latency_s: float = Field(0.1, ge=0, description="Fixed seconds per transfer (download or upload of > 0 bytes).")


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


@dataclass(frozen=True)
class RoundWork:
    """What a device did in one round, in the cost model's units (see WORK_KEYS)."""

    embed_items: int
    train_examples: int
    epochs: int
    rank: int
    eval_items: int
    upload_bytes: int

    def cost_work(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> "RoundWork":
        """The work a device round's reply metrics (`DeviceRoundResult.metrics()`) describe."""
        return cls(
            embed_items=int(metrics["new_interactions"]),
            train_examples=int(metrics["examples"]),
            epochs=int(metrics["epochs"]),
            rank=int(metrics["lora_rank"]),
            eval_items=int(metrics["eval_items"]),
            upload_bytes=int(metrics["upload_bytes"]),
        )
