"""Which LoRA tensors a strategy shares with the server, and which stay on the device.

- "all": FedAvg of the whole adapter (A and B).
- "A":   FedSA-LoRA's split for global+personal: A is shared (it learns what devices have in
         common), B stays on the device as its personal part.
- "B":   FFA-LoRA: A is a seeded constant that no device trains, only B is trained and shared;
         the aggregate of B is then exactly the average of the devices' products' B factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from fedasls.federated.fedavg import TensorDict
from fedasls.federated.ranks import lora_kind

Shared = Literal["all", "A", "B"]
SHARED_PARTS: tuple[str, ...] = ("all", "A", "B")
STRATEGIES = ("local", "global", "global+personal")


def shared_part_of(strategy: str, ffa: bool) -> Shared:
    """Which LoRA tensors a strategy shares: 'all' (global), 'B' (global + FFA), 'A' (global+personal)."""
    if strategy == "global":
        return "B" if ffa else "all"
    if strategy == "global+personal":
        if ffa:
            raise ValueError("FFA-LoRA freezes A, but global+personal shares A: use ffa with strategy 'global'")
        return "A"
    raise ValueError(f"strategy {strategy!r} shares no adapter; expected one of {STRATEGIES[1:]}")


def is_shared(key: str, shared: Shared) -> bool:
    if shared not in SHARED_PARTS:
        raise ValueError(f"shared part must be one of {SHARED_PARTS}, got {shared!r}")
    return shared == "all" or lora_kind(key) == shared


def shared_part(state: Mapping[str, torch.Tensor], shared: Shared) -> TensorDict:
    """The tensors of `state` that leave the device under `shared` (same order)."""
    return {k: v for k, v in state.items() if is_shared(k, shared)}


def personal_part(state: Mapping[str, torch.Tensor], shared: Shared) -> TensorDict:
    """The tensors of `state` that never leave the device under `shared`."""
    return {k: v for k, v in state.items() if not is_shared(k, shared)}
