"""Federated averaging of tensor dicts (LoRA state dicts or their updates)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

TensorDict = dict[str, torch.Tensor]


def check_same_layout(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise ValueError unless every dict has the same keys in the same order and the same shapes."""
    if not states:
        raise ValueError("nothing to aggregate: no tensor dicts were given")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            missing = sorted(set(keys) - set(state))[:3]
            extra = sorted(set(state) - set(keys))[:3]
            raise ValueError(
                f"tensor dict {i} does not have the keys of dict 0 in the same order (missing {missing}, extra {extra}); "
                "pad every reply to the global adapter's layout first (fedasls.federated.ranks.pad)"
            )
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise ValueError(
                    f"tensor '{key}' has shape {tuple(state[key].shape)} in dict {i} but {tuple(states[0][key].shape)} "
                    "in dict 0; pad every reply to the largest LoRA rank first"
                )


def weighted_sum(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> TensorDict:
    """sum_i w_i * state_i, key by key, in float32 (weights default to 1)."""
    check_same_layout(states)
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states):
        raise ValueError(f"{len(weights)} weights for {len(states)} tensor dicts")
    out: TensorDict = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for w, state in zip(weights, states):
            acc += w * state[key].to(torch.float32)
        out[key] = acc
    return out


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> TensorDict:
    """FedAvg: the weighted mean sum_i w_i x_i / sum_i w_i (weights default to equal, e.g. example counts)."""
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"FedAvg weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    return {k: v / total for k, v in weighted_sum(states, weights).items()}


def add(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> TensorDict:
    """base + scale * delta for the keys of `delta` (which must all be in `base`); other keys are copied."""
    unknown = [k for k in delta if k not in base]
    if unknown:
        raise ValueError(f"update holds tensors the global adapter does not have: {unknown[:3]}")
    out = {k: v.clone() for k, v in base.items()}
    for key, value in delta.items():
        out[key] = out[key] + scale * value.to(out[key].dtype)
    return out


def subtract(after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> TensorDict:
    """after - before, key by key (keys and shapes must match)."""
    check_same_layout([after, before])
    return {k: after[k].to(torch.float32) - before[k].to(torch.float32) for k in after}


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a tensor dict as one flat vector (in float64)."""
    return math.sqrt(sum(float(v.to(torch.float64).pow(2).sum()) for v in update.values()))
