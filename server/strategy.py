"""The round-strategy seam: what each sampled device receives, how completed replies aggregate,
and the state a checkpoint keeps. The fleet loop calls, per round:

    stop_reason()                     -> why no further round may run (e.g. the DP budget), or None
    configure(server_round)           -> records added to every sampled device's message
    aggregate(round, replies, done)   -> round metrics; only devices in `outcome.completed` count
    state(round, run_dir) / load_state(state, run_dir)

Strategies: `local` (only metrics leave), `global` (FedAvg of one shared LoRA adapter; with
[federated] ffa, FFA-LoRA's B only), `global+personal` (FedSA-LoRA: A shared, B personal), and
`DPFedAvg`, a wrapper that noises the sum of the (device-clipped) updates and accounts each
round at user level. The maths are Flower-free (fedasls.federated); this module only moves
tensors in and out of Flower's ArrayRecord. (Flower's own strategies run their own round loop and
draw unseeded noise, so they do not fit a loop with a virtual clock and exact resume.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, Message
from safetensors.torch import load_file, save_file

from wire.messages import GLOBAL_ADAPTER_KEY, device_metrics, reply_updates
from fedasls.config import Settings
from fedasls.privacy.user_level import UserLevelAccountant
from fedasls.privacy.clipping import l2_norm
from fedasls.federated.fedavg import TensorDict, add, fedavg
from fedasls.federated.init import initial_global
from fedasls.privacy.noise import dp_fedavg
from fedasls.federated.split import shared_part, shared_part_of
from fedasls.device.store import atomic_write

ADAPTER_DIR = "global-adapter"
PRIVACY_FILE = "privacy.json"


class RoundStrategy(Protocol):
    name: str

    def stop_reason(self) -> str | None: ...

    def configure(self, server_round: int) -> dict[str, Any]: ...

    def aggregate(self, server_round: int, replies: list[Message], completed: list[int]) -> dict[str, float]: ...

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None: ...


def completed_updates(replies: list[Message], completed: list[int]) -> tuple[list[TensorDict], list[float], list[int]]:
    """(updates, example weights, device ids) of completed devices that sent an update, in `completed` order."""
    by_device: dict[int, tuple[TensorDict, float]] = {}
    for reply in replies:
        updates = reply_updates(reply)  # one device's reply, or a worker slot's batch
        if not updates:
            continue
        examples = {int(m["device_id"]): float(m["examples"]) for m in device_metrics(reply)}
        by_device |= {d: (update, examples[d]) for d, update in updates.items()}
    ids = [d for d in completed if d in by_device]
    return [by_device[d][0] for d in ids], [by_device[d][1] for d in ids], ids


class LocalStrategy:
    """Today's behaviour: devices personalize alone; nothing but metrics leaves."""

    name = "local"

    def stop_reason(self) -> str | None:
        return None

    def configure(self, server_round: int) -> dict[str, Any]:
        return {}

    def aggregate(self, server_round: int, replies: list[Message], completed: list[int]) -> dict[str, float]:
        return {}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        return {"name": self.name}

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        return None


class GlobalAdapterStrategy:
    """FedAvg of the shared part of one LoRA adapter, held at the largest rank (HetLoRA).

    Devices of smaller ranks truncate it and reply zero-padded; the average is weighted by the
    devices' training examples; global += server_lr * average.
    """

    def __init__(self, settings: Settings) -> None:
        # Here, not at the top: the layout needs peft and the model's config, which a driver running
        # only local personalization never imports (it starts faster without them).
        from fedasls.lm.adapter_layout import adapter_layout

        f = settings.federated
        self.name = f"{f.strategy}{' (FFA-LoRA)' if f.ffa else ''}"
        self.shared = shared_part_of(f.strategy, f.ffa)
        self.server_lr = f.server_lr
        self.adapter: TensorDict = shared_part(initial_global(adapter_layout(settings), f.seed), self.shared)

    def stop_reason(self) -> str | None:
        return None

    def configure(self, server_round: int) -> dict[str, Any]:
        return {GLOBAL_ADAPTER_KEY: ArrayRecord(dict(self.adapter))}

    def apply(self, mean_update: Mapping[str, torch.Tensor]) -> float:
        """global += server_lr * mean_update; returns the norm of the step taken."""
        self.adapter = add(self.adapter, mean_update, self.server_lr)
        return self.server_lr * l2_norm(mean_update)

    def aggregate(self, server_round: int, replies: list[Message], completed: list[int]) -> dict[str, float]:
        updates, weights, ids = completed_updates(replies, completed)
        if not updates or sum(weights) <= 0:
            return {"contributors": len(ids), "global_step_norm": 0.0}
        step = self.apply(fedavg(updates, weights))
        return {"contributors": len(ids), "global_step_norm": step}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        """Write the global adapter as of `server_round` (one file per round, so a kill between this
        write and the checkpoint's never mixes rounds) and return the checkpoint entry."""
        folder = run_dir / ADAPTER_DIR
        folder.mkdir(exist_ok=True)
        name = f"round-{server_round:05d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.adapter.items()}, str(tmp), metadata={"order": json.dumps(list(self.adapter))})
        os.replace(tmp, folder / name)
        for old in sorted(folder.glob("round-*.safetensors"))[:-2]:  # keep this round and the one before
            old.unlink()
        return {"name": self.name, "adapter_file": f"{ADAPTER_DIR}/{name}"}

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        loaded = load_file(str(run_dir / state["adapter_file"]))
        if set(loaded) != set(self.adapter):
            raise ValueError(f"{state['adapter_file']}: its tensors are not this run's global adapter; resume with the "
                             "settings it was written with")
        self.adapter = {k: loaded[k] for k in self.adapter}  # the global order, not the file's


class DPFedAvg:
    """User-level DP wrapper: devices clip their updates to C; the server sums them, adds
    N(0, (z C)^2) seeded per round, divides by the expected cohort, and accounts the round
    (Poisson sampling at rate q). It stops before a round would exceed the target epsilon."""

    def __init__(self, inner: GlobalAdapterStrategy, settings: Settings, sample_rate: float, expected_cohort: float) -> None:
        f = settings.federated
        self.inner = inner
        self.name = f"DP-FedAvg({inner.name})"
        self.clip_norm, self.noise_multiplier, self.seed = f.clip_norm, f.noise_multiplier, f.seed
        self.target_epsilon = f.target_epsilon
        self.sample_rate, self.expected_cohort = sample_rate, expected_cohort
        self.accountant = UserLevelAccountant(f.noise_multiplier, f.delta, f.neighbouring)

    def stop_reason(self) -> str | None:
        if self.target_epsilon and self.accountant.would_exceed(self.target_epsilon, self.sample_rate):
            return (f"stopped before round {self.accountant.rounds + 1}: it would raise the user-level epsilon from "
                    f"{self.accountant.epsilon():.4g} to {self.accountant.epsilon_after(self.sample_rate):.4g}, above "
                    f"the target {self.target_epsilon:g} (delta {self.accountant.delta:g}, Poisson sampling q = "
                    f"{self.sample_rate:.4g}, {self.accountant.neighbouring})")
        return None

    def configure(self, server_round: int) -> dict[str, Any]:
        return self.inner.configure(server_round)

    def aggregate(self, server_round: int, replies: list[Message], completed: list[int]) -> dict[str, float]:
        updates, _, ids = completed_updates(replies, completed)  # unweighted: weights would raise sensitivity
        agg = dp_fedavg(updates, self.clip_norm, self.noise_multiplier, self.expected_cohort, self.seed, server_round,
                        layout=self.inner.adapter)
        step = self.inner.apply(agg.mean)
        self.accountant.compose(self.sample_rate)
        return {"contributors": len(ids), "global_step_norm": step, "snr": agg.snr,
                "user_epsilon": self.accountant.epsilon(), "user_delta": self.accountant.delta}

    def report(self) -> dict[str, Any]:
        rep = self.accountant.report()
        return {"report": str(rep), **rep.to_dict(), "target_epsilon": self.target_epsilon or None,
                "covers": "the global adapter only: the per-device metric replies (a simulation instrument) are not "
                          "noised and are not covered by this epsilon"}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        out = self.inner.state(server_round, run_dir) | {"accountant": self.accountant.state()}
        _write_json(run_dir / PRIVACY_FILE, self.report())
        return out

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        self.inner.load_state(state, run_dir)
        self.accountant = UserLevelAccountant.from_state(state["accountant"])


def make_strategy(settings: Settings, sample_rate: float, expected_cohort: float) -> RoundStrategy:
    """The strategy [federated] asks for (DP-FedAvg wraps the global-adapter strategy when dp = true)."""
    f = settings.federated
    if f.strategy == "local":
        return LocalStrategy()
    inner = GlobalAdapterStrategy(settings)
    return DPFedAvg(inner, settings, sample_rate, expected_cohort) if f.dp else inner


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, allow_nan=True).encode("utf-8"))
