"""Heterogeneous LoRA ranks (HetLoRA): the server holds the global adapter at the largest rank.

peft stores lora_A as (rank, in_features) and lora_B as (out_features, rank). A device of rank r
takes the first r rows of every A and the first r columns of every B; its reply is zero-padded
back to the largest rank under the same keys in the same order, so plain FedAvg, clipping and
secure aggregation see one fixed layout. (peft scales B @ A by alpha / r, so a truncated adapter
is applied with a larger scale than the full one: the devices' alpha/r is part of their model.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedasls.federated.fedavg import TensorDict


def lora_kind(key: str) -> str:
    """'A' or 'B' for a peft LoRA weight key; ValueError for anything else."""
    if ".lora_A." in key or key.endswith(".lora_A.weight"):
        return "A"
    if ".lora_B." in key or key.endswith(".lora_B.weight"):
        return "B"
    raise ValueError(f"'{key}' is not a LoRA A/B weight (peft keys contain '.lora_A.' or '.lora_B.')")


def rank_of(state: Mapping[str, torch.Tensor]) -> int:
    """The LoRA rank of a state dict (all its A and B tensors must agree)."""
    ranks = {int(v.shape[0] if lora_kind(k) == "A" else v.shape[1]) for k, v in state.items()}
    if len(ranks) != 1:
        raise ValueError(f"the adapter mixes LoRA ranks {sorted(ranks)}")
    return ranks.pop()


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> TensorDict:
    """The rank-`rank` part of a larger adapter: A[:rank, :], B[:, :rank] (copies, same key order)."""
    out: TensorDict = {}
    for key, value in state.items():
        have = value.shape[0] if lora_kind(key) == "A" else value.shape[1]
        if rank > have:
            raise ValueError(f"cannot truncate '{key}' of rank {have} to the larger rank {rank}")
        out[key] = (value[:rank, :] if lora_kind(key) == "A" else value[:, :rank]).clone()
    return out


def pad(state: Mapping[str, torch.Tensor], rank: int) -> TensorDict:
    """Zero-pad a device's adapter (or update) to `rank`: extra rows of A, extra columns of B are 0."""
    out: TensorDict = {}
    for key, value in state.items():
        kind = lora_kind(key)
        have = value.shape[0] if kind == "A" else value.shape[1]
        if have > rank:
            raise ValueError(f"'{key}' has rank {have}, above the global adapter's rank {rank}")
        if kind == "A":
            padded = torch.zeros((rank, value.shape[1]), dtype=value.dtype)
            padded[:have, :] = value
        else:
            padded = torch.zeros((value.shape[0], rank), dtype=value.dtype)
            padded[:, :have] = value
        out[key] = padded
    return out
