"""The round-strategy protocol, Flower-free: what a round sends the devices and how their replies aggregate.

The fleet loop (server/rounds.py), a benchmark or a test calls, per round:

    stop_reason()                                -> why no further round may run (e.g. the DP budget), or None
    configure_train(round, devices)              -> the Downlink every sampled device receives (None: local)
    aggregate_train(round, contributions)        -> round metrics (numbers); the strategy updates its model
    state(round, run_dir) / load_state(state, run_dir)   checkpoint entry and exact resume

A `Downlink` carries the global adapter's shared tensors AND every knob the device's round needs;
a device reads nothing else about the strategy. A `Contribution` is one decoded reply (or, under
DP or SecAgg+, the cohort's aggregate, see AGGREGATE). Flower types stay in server/ and wire/.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

AGGREGATE = -1  # Contribution.device_id of a cohort's aggregate (DP noised mean, SecAgg+ weighted mean)


@dataclass(frozen=True)
class Downlink:
    """What a device receives for a global-adapter round: the tensors and how to use them."""

    strategy: str  # "global" or "global+personal" (which tensors the device keeps as its own)
    ffa: bool  # FFA-LoRA: A is the seeded initial A, frozen during training
    max_rank: int  # the global adapter's LoRA rank (devices truncate it, pad their update back)
    seed: int  # seed of the initial global adapter (the parts a device does not receive)
    clip_norm: float  # L2 bound of the device's whole update
    shared: Mapping[str, torch.Tensor]  # the global adapter's shared tensors at max_rank, in the global order
    contribute: str = "trained"  # "trained": every trained candidate is sent; "accepted": only gate-accepted ones
    cold_adoption: int = 0  # questions a device without an adapter compares the base and global models on
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 on the shared tensors during training (0 = off)
    report_unclipped: bool = False  # adaptive clipping: the device reports the bit "my update's norm was <= clip_norm"


@dataclass(frozen=True)
class Contribution:
    """One device's decoded reply: its update of the shared tensors (downlink order), its weight
    (training examples) and its scalar metrics."""

    device_id: int
    update: Mapping[str, torch.Tensor]
    weight: float
    metrics: Mapping[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """A round strategy. A new algorithm is one class (see FedProx in fedasls/federated/strategies.py);
    a privacy mechanism is a wrapper of this protocol (DPFedAvg in fedasls/privacy/dp_fedavg.py)."""

    name: str

    def stop_reason(self) -> str | None: ...

    def configure_train(self, server_round: int, devices: Sequence[int]) -> Downlink | None: ...

    def aggregate_train(self, server_round: int, contributions: Sequence[Contribution]) -> dict[str, float]: ...

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None: ...
