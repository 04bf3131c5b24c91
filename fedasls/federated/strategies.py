"""The round strategies ([federated] strategy): local, FedAvg of one shared LoRA adapter, FedProx.

- `LocalStrategy`: devices personalize alone; nothing but metrics leaves (no downlink).
- `FedAvg`: the shared part of one LoRA adapter held at the largest rank (HetLoRA); with ffa,
  FFA-LoRA's B only; under global+personal, FedSA-LoRA's A. Devices of smaller ranks truncate it
  and reply zero-padded; the mean is weighted by training examples; global += server_lr * mean.
- `FedProx`: FedAvg whose devices add (mu/2) ||w - w_global||^2 to their training loss.

`make_global_strategy` picks FedAvg or FedProx from the settings. DP-FedAvg wraps any of them
(fedasls/privacy/dp_fedavg.py); SecAgg+ hands them the securely aggregated mean (server/secagg.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from fedasls.federated.fedavg import TensorDict, add, fedavg, l2_norm
from fedasls.federated.init import initial_global
from fedasls.federated.settings import FederatedSettings
from fedasls.federated.split import shared_part, shared_part_of
from fedasls.federated.strategy import Contribution, Downlink
from fedasls.files import atomic_write

ADAPTER_DIR = "global-adapter"  # run_dir/global-adapter/round-NNNNN.safetensors


class LocalStrategy:
    """Devices personalize alone; nothing but metrics leaves."""

    name = "local"

    def stop_reason(self) -> str | None:
        return None

    def configure_train(self, server_round: int, devices: Sequence[int]) -> Downlink | None:
        return None

    def aggregate_train(self, server_round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        return {}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        return {"name": self.name}

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        return None


class FedAvg:
    """FedAvg of the shared part of one LoRA adapter, held at the largest rank (HetLoRA)."""

    def __init__(self, federated: FederatedSettings, layout: Mapping[str, tuple[int, int]], max_rank: int) -> None:
        """`layout`: the max-rank shapes of the model's LoRA tensors (fedasls.lm.adapter_layout)."""
        f = federated
        self.name = f"{f.strategy}{' (FFA-LoRA)' if f.ffa else ''}"
        self.server_lr = f.server_lr
        self.adapter: TensorDict = shared_part(initial_global(layout, f.seed), shared_part_of(f.strategy, f.ffa))
        self.knobs: dict[str, Any] = {"strategy": f.strategy, "ffa": f.ffa, "max_rank": max_rank, "seed": f.seed,
                                      "clip_norm": f.clip_norm, "contribute": f.contribute,
                                      "cold_adoption": f.cold_adoption}

    def stop_reason(self) -> str | None:
        return None

    def configure_train(self, server_round: int, devices: Sequence[int]) -> Downlink:
        return Downlink(shared=self.adapter, **self.knobs)

    def aggregate_train(self, server_round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        weights = [c.weight for c in contributions]
        if not contributions or sum(weights) <= 0:
            return {"contributors": len(contributions), "global_step_norm": 0.0}
        mean = fedavg([c.update for c in contributions], weights)
        self.adapter = add(self.adapter, mean, self.server_lr)
        return {"contributors": len(contributions), "global_step_norm": self.server_lr * l2_norm(mean)}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        """Write the global adapter as of `server_round` (one file per round, so a kill between this
        write and the checkpoint's never mixes rounds) and return the checkpoint entry."""
        folder = run_dir / ADAPTER_DIR
        folder.mkdir(exist_ok=True)
        name = f"round-{server_round:05d}.safetensors"
        data = save_tensors({k: v.contiguous() for k, v in self.adapter.items()},
                            metadata={"order": json.dumps(list(self.adapter))})
        atomic_write(folder / name, data)
        for old in sorted(folder.glob("round-*.safetensors"))[:-2]:  # keep this round and the one before
            old.unlink()
        return {"name": self.name, "adapter_file": f"{ADAPTER_DIR}/{name}"}

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        loaded = load_file(str(run_dir / state["adapter_file"]))
        if set(loaded) != set(self.adapter):
            raise ValueError(f"{state['adapter_file']}: its tensors are not this run's global adapter; resume with the "
                             "settings it was written with")
        self.adapter = {k: loaded[k] for k in self.adapter}  # the global order, not the file's


class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg, and each device trains with (mu/2) ||w - w_global||^2 added
    to its loss on the shared tensors ([federated] proximal_mu), which bounds its drift."""

    def __init__(self, federated: FederatedSettings, layout: Mapping[str, tuple[int, int]], max_rank: int) -> None:
        super().__init__(federated, layout, max_rank)
        self.mu = federated.proximal_mu
        self.name = f"{self.name}, FedProx(mu={self.mu:g})"

    def configure_train(self, server_round: int, devices: Sequence[int]) -> Downlink:
        return replace(super().configure_train(server_round, devices), proximal_mu=self.mu)


def make_global_strategy(federated: FederatedSettings, layout: Mapping[str, tuple[int, int]],
                         max_rank: int) -> FedAvg:
    """The global-adapter strategy [federated] asks for: FedProx when proximal_mu > 0, else FedAvg."""
    cls = FedProx if federated.proximal_mu > 0 else FedAvg
    return cls(federated, layout, max_rank)
