"""DP-FedAvg (user-level central DP) as a wrapper of any round strategy (fedasls.federated.strategy).

Devices clip their whole update to C (the downlink's clip_norm is the wrapper's C). The wrapper
sums the clipped updates unweighted (weights would raise the sensitivity), adds N(0, (z C)^2)
seeded per round, divides by the expected cohort (fedasls.privacy.noise), and hands the inner
strategy that noised mean as ONE contribution (device_id AGGREGATE, weight 1), so the inner
strategy applies it as its aggregate. Each round is accounted at user level under Poisson sampling
at rate q; the wrapper stops the run before a round would exceed the target epsilon.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedasls.federated.settings import FederatedSettings
from fedasls.federated.strategy import AGGREGATE, Contribution, Downlink, Strategy
from fedasls.files import atomic_write
from fedasls.privacy.noise import dp_fedavg
from fedasls.privacy.user_level import UserLevelAccountant

PRIVACY_FILE = "privacy.json"


class DPFedAvg:
    """User-level DP wrapper of a strategy: clipped sum + seeded Gaussian noise / expected cohort."""

    def __init__(self, inner: Strategy, federated: FederatedSettings, sample_rate: float,
                 expected_cohort: float) -> None:
        f = federated
        self.inner = inner
        self.name = f"DP-FedAvg({inner.name})"
        self.clip_norm, self.noise_multiplier, self.seed = f.clip_norm, f.noise_multiplier, f.seed
        self.target_epsilon = f.target_epsilon
        self.sample_rate, self.expected_cohort = sample_rate, expected_cohort
        self.accountant = UserLevelAccountant(f.noise_multiplier, f.delta, f.neighbouring)
        self.layout: Mapping | None = None  # the last downlink's tensors (a round without updates noises these)

    def stop_reason(self) -> str | None:
        if self.target_epsilon and self.accountant.would_exceed(self.target_epsilon, self.sample_rate):
            return (f"stopped before round {self.accountant.rounds + 1}: it would raise the user-level epsilon from "
                    f"{self.accountant.epsilon():.4g} to {self.accountant.epsilon_after(self.sample_rate):.4g}, above "
                    f"the target {self.target_epsilon:g} (delta {self.accountant.delta:g}, Poisson sampling q = "
                    f"{self.sample_rate:.4g}, {self.accountant.neighbouring})")
        return self.inner.stop_reason()

    def configure_train(self, server_round: int, devices: Sequence[int]) -> Downlink | None:
        downlink = self.inner.configure_train(server_round, devices)
        if downlink is None:
            raise ValueError(f"DP-FedAvg needs a strategy that shares an adapter; {self.inner.name} sends none")
        self.layout = downlink.shared
        return replace(downlink, clip_norm=self.clip_norm)  # devices clip to the C the noise is calibrated to

    def aggregate_train(self, server_round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        agg = dp_fedavg([c.update for c in contributions], self.clip_norm, self.noise_multiplier,
                        self.expected_cohort, self.seed, server_round, layout=self.layout)
        out = self.inner.aggregate_train(server_round, [Contribution(AGGREGATE, agg.mean, 1.0)])
        self.accountant.compose(self.sample_rate)
        return out | {"contributors": len(contributions), "snr": agg.snr, "user_epsilon": self.accountant.epsilon(),
                      "user_delta": self.accountant.delta}

    def report(self) -> dict[str, Any]:
        rep = self.accountant.report()
        return {"report": str(rep), **rep.to_dict(), "target_epsilon": self.target_epsilon or None,
                "covers": "the global adapter only: the per-device metric replies (a simulation instrument) are not "
                          "noised and are not covered by this epsilon"}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        out = self.inner.state(server_round, run_dir) | {"accountant": self.accountant.state()}
        atomic_write(run_dir / PRIVACY_FILE, json.dumps(self.report(), indent=2, allow_nan=True).encode("utf-8"))
        return out

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        self.inner.load_state(state, run_dir)
        self.accountant = UserLevelAccountant.from_state(state["accountant"])
