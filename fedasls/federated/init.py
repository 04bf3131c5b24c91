"""The seeded initial global adapter, rebuilt identically by every device and by the server.

A of every LoRA layer ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming-uniform init with a = sqrt(5)),
B = 0, drawn at the largest rank from a generator seeded per (seed, key position): a device of
rank r truncates it, so all devices start from (and, under FFA-LoRA, keep) the same A rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedasls.federated.fedavg import TensorDict
from fedasls.federated.ranks import lora_kind


def global_shapes(template: Mapping[str, torch.Tensor], rank: int) -> dict[str, tuple[int, int]]:
    """The max-rank shapes of an adapter whose keys and feature sizes are those of `template` (any rank)."""
    return {
        k: ((rank, int(v.shape[1])) if lora_kind(k) == "A" else (int(v.shape[0]), rank)) for k, v in template.items()
    }


def initial_global(shapes: Mapping[str, tuple[int, int]], seed: int) -> TensorDict:
    """A seeded (A random, B zero) adapter with these max-rank shapes, in the given key order."""
    out: TensorDict = {}
    for position, (key, shape) in enumerate(shapes.items()):
        if lora_kind(key) == "A":
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + position)
            bound = 1.0 / math.sqrt(shape[1])
            out[key] = (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound
        else:
            out[key] = torch.zeros(shape)
    return out
