"""DP-FedAvg (user-level central DP) as a wrapper of any round strategy (fedasls.federated.strategy).

Devices clip their whole update to C (the downlink's clip_norm is the wrapper's C). The wrapper
sums the clipped updates unweighted (weights would raise the sensitivity), adds N(0, (z C)^2) drawn
from the server's secret randomness (fedasls.privacy.secrets), divides by the expected cohort
(fedasls.privacy.noise), and hands the inner strategy that noised mean as ONE contribution
(device_id AGGREGATE, weight 1), so the inner strategy applies it as its aggregate. Each round is
accounted at user level under Poisson sampling at rate q; the wrapper stops the run before a round
would exceed the target epsilon. With `calibrate_epsilon` z is chosen for the planned rounds; with
`noise_cohort_size` the noise and the accounting are a production cohort's (see FederatedSettings).
Released per round: the noised adapter and epsilon; the contributor count and the signal-to-noise
ratio (both from the clipped sum without noise) only with `release_diagnostics`, marked as not
covered by epsilon.
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
from fedasls.privacy.secrets import KNOWN_SEED_WARNING, DpSecrets
from fedasls.privacy.user_level import UserLevelAccountant, calibrate_noise_multiplier

PRIVACY_FILE = "privacy.json"


class DPFedAvg:
    """User-level DP wrapper of a strategy: clipped sum + secret Gaussian noise / expected cohort."""

    def __init__(self, inner: Strategy, federated: FederatedSettings, sample_rate: float,
                 expected_cohort: float, secrets: DpSecrets, planned_rounds: int = 1) -> None:
        f = federated
        self.inner = inner
        self.name = f"DP-FedAvg({inner.name})"
        self.secrets = secrets
        self.clip_norm, self.target_epsilon = f.clip_norm, f.target_epsilon
        self.expected_cohort = expected_cohort
        self.noise_cohort = float(f.noise_cohort_size) or None
        # the sampling rate the epsilon is accounted at: the simulation's, or the production regime's
        self.sample_rate = f.noise_cohort_size / f.noise_population_size if f.noise_cohort_size else sample_rate
        self.noise_multiplier = (calibrate_noise_multiplier(f.calibrate_epsilon, f.delta, planned_rounds,
                                                            self.sample_rate, f.neighbouring, f.accountant)
                                 if f.calibrate_epsilon else f.noise_multiplier)
        self.accountant = UserLevelAccountant(self.noise_multiplier, f.delta, f.neighbouring, accountant=f.accountant)
        self.release_diagnostics = f.release_diagnostics
        self.regime = (f"production regime simulated: noise of a cohort of {f.noise_cohort_size} per round and "
                       f"q = {f.noise_cohort_size}/{f.noise_population_size}; the simulation trained about "
                       f"{expected_cohort:g} devices a round" if f.noise_cohort_size else None)
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
                        self.expected_cohort, self.secrets.noise, server_round, layout=self.layout,
                        noise_cohort=self.noise_cohort)
        out = self.inner.aggregate_train(server_round, [Contribution(AGGREGATE, agg.mean, 1.0)])
        self.accountant.compose(self.sample_rate)
        row: dict[str, Any] = {"user_epsilon": self.accountant.epsilon(), "user_delta": self.accountant.delta,
                               "user_sampling": f"poisson q={self.sample_rate:.6g}",
                               "user_neighbouring": self.accountant.neighbouring,
                               "user_accountant": self.accountant.accountant}
        if self.secrets.from_seed:
            row["user_epsilon_caveat"] = KNOWN_SEED_WARNING
        if self.release_diagnostics:  # from the clipped sum without noise: outside the guarantee
            row |= {"contributors": len(contributions), "snr": agg.snr,
                    "diagnostics_note": "contributors and snr are not covered by epsilon"}
        return {k: v for k, v in out.items() if k not in ("contributors", "snr")} | row

    def report(self) -> dict[str, Any]:
        rep = self.accountant.report()
        caveats = [c for c in (KNOWN_SEED_WARNING if self.secrets.from_seed else None, self.regime) if c]
        text = str(rep) + "".join(f"; {c}" for c in caveats)
        return {"report": text, **rep.to_dict(), "target_epsilon": self.target_epsilon or None,
                "caveats": caveats,
                "covers": "the global adapter only: the per-device metric replies (a simulation instrument) are not "
                          "noised and are not covered by this epsilon"}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        out = self.inner.state(server_round, run_dir) | {"accountant": self.accountant.state()}
        atomic_write(run_dir / PRIVACY_FILE, json.dumps(self.report(), indent=2, allow_nan=True).encode("utf-8"))
        return out

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        self.inner.load_state(state, run_dir)
        self.accountant = UserLevelAccountant.from_state(state["accountant"])
