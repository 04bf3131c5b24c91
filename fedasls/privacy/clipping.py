"""Per-device clipping of a whole update (DP-FedAvg): the L2 norm over ALL its tensors is at most C."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedasls.federated.fedavg import TensorDict, l2_norm


@dataclass(frozen=True)
class Clipped:
    update: TensorDict
    norm: float  # before clipping
    factor: float  # min(1, C / norm)


def clip(update: Mapping[str, torch.Tensor], clip_norm: float) -> Clipped:
    """Scale the update by min(1, C / ||update||) so that its L2 norm is at most C."""
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip norm must be a finite number > 0, got {clip_norm!r} (set [federated] clip_norm)")
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or infinite values; it cannot be clipped or sent")
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    return Clipped({k: v.to(torch.float32) * factor for k, v in update.items()}, norm, factor)
