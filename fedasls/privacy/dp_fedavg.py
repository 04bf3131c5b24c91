"""DP-FedAvg (user-level central DP) as a wrapper of any round strategy (fedasls.federated.strategy).

Devices clip their whole update to C (the downlink's clip_norm is the wrapper's C). The wrapper
sums the clipped updates unweighted (weights would raise the sensitivity), adds N(0, (z C)^2) drawn
from the server's secret randomness (fedasls.privacy.secrets), divides by the expected cohort
(fedasls.privacy.noise), and hands the inner strategy that noised mean as ONE contribution
(device_id AGGREGATE, weight 1), so the inner strategy applies it as its aggregate. Each round is
accounted at user level under Poisson sampling at rate q; the wrapper stops the run before a round
would exceed the target epsilon. With `calibrate_epsilon` z is chosen for the planned rounds; with
`noise_cohort_size` the noise and the accounting are a production cohort's (see FederatedSettings).
Under SecAgg+ (server/secagg.py) the wrapper receives the securely aggregated SUM of the clipped
updates as one `summed_contribution` instead (every device weighted alike, so the protocol's mean
times the count is that sum) and adds the same noise to it, scaled to the sum's sensitivity.
Released per round: the noised adapter and epsilon; the contributor count and the signal-to-noise
ratio (both from the clipped sum without noise) only with `release_diagnostics`, marked as not
covered by epsilon.

With `adaptive_clipping` (fedasls.privacy.adaptive_clipping) C moves every round toward a quantile of
the update norms, from a noised count of the devices' unclipped bits (count noise from its own
stream of the secret); noise_multiplier is then the accounted z of the update sum and the count
together, the update noise is raised to match, and C goes into the downlink, rounds.jsonl and the
checkpoint (so a resume continues with it).
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
from fedasls.privacy.adaptive_clipping import (UNCLIPPED_METRIC, AdaptiveClipping, default_count_stddev,
                                               noised_unclipped_fraction, update_noise_multiplier)
from fedasls.privacy.noise import dp_fedavg, noised_sum
from fedasls.privacy.secrets import KNOWN_SEED_WARNING, DpSecrets
from fedasls.privacy.user_level import UserLevelAccountant, calibrate_noise_multiplier

PRIVACY_FILE = "privacy.json"
SUMMED_DEVICES = "summed_devices"  # an AGGREGATE contribution's metric: it is the SUM of this many clipped updates
SENSITIVITY = "sensitivity"  # ... and that sum's L2 sensitivity (C, inflated by SecAgg+'s quantization)


def summed_contribution(total: Mapping, devices: int, sensitivity: float) -> Contribution:
    """A pre-summed aggregate for DPFedAvg (SecAgg+ under DP): the sum of `devices` clipped updates,
    whose L2 sensitivity (one device added or removed) is at most `sensitivity`."""
    return Contribution(AGGREGATE, total, float(devices), {SUMMED_DEVICES: devices, SENSITIVITY: sensitivity})


def presummed(contributions: Sequence[Contribution]) -> tuple[Mapping, int, float] | None:
    """(sum, devices, sensitivity) if `contributions` is one `summed_contribution`, else None."""
    if len(contributions) == 1 and contributions[0].device_id == AGGREGATE \
            and SUMMED_DEVICES in contributions[0].metrics:
        c = contributions[0]
        return c.update, int(c.metrics[SUMMED_DEVICES]), float(c.metrics[SENSITIVITY])
    return None


class DPFedAvg:
    """User-level DP wrapper of a strategy: clipped sum + secret Gaussian noise / expected cohort."""

    def __init__(self, inner: Strategy, federated: FederatedSettings, sample_rate: float,
                 expected_cohort: float, secrets: DpSecrets, planned_rounds: int = 1,
                 caveats: Sequence[str] = ()) -> None:
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
        self.caveats = list(caveats)  # what else every report must say (e.g. SecAgg+'s slot overflow)
        self.layout: Mapping | None = None  # the last downlink's tensors (a round without updates noises these)
        # adaptive clipping: noise_multiplier is the accounted z; the update sum gets z_update >= z
        self.adaptive = (AdaptiveClipping(f.target_unclipped_quantile, f.clip_learning_rate)
                         if f.adaptive_clipping else None)
        self.count_stddev = ((f.clipped_count_stddev or default_count_stddev(self.noise_cohort or expected_cohort))
                             if self.adaptive else None)
        self.update_multiplier = (update_noise_multiplier(self.noise_multiplier, self.count_stddev)
                                  if self.count_stddev else self.noise_multiplier)

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
        return replace(downlink, clip_norm=self.clip_norm,  # devices clip to the C the noise is calibrated to
                       report_unclipped=self.adaptive is not None)

    def aggregate_train(self, server_round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        summed = presummed(contributions)
        if summed is not None:  # SecAgg+: the securely aggregated sum of the clipped updates, one noise draw
            total, count, sensitivity = summed
            agg = noised_sum(total, count, max(sensitivity, self.clip_norm), self.update_multiplier,
                             self.expected_cohort, self.secrets.noise, server_round, noise_cohort=self.noise_cohort)
        else:
            agg = dp_fedavg([c.update for c in contributions], self.clip_norm, self.update_multiplier,
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
        if self.adaptive is not None:
            row |= self._adapt_clip_norm(server_round, contributions)
        if self.release_diagnostics:  # from the clipped sum without noise: outside the guarantee
            row |= {"contributors": agg.contributors, "snr": agg.snr,
                    "diagnostics_note": "contributors and snr are not covered by epsilon"}
        return {k: v for k, v in out.items() if k not in ("contributors", "snr")} | row

    def _adapt_clip_norm(self, server_round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        """Release the noised unclipped share of the round and move C by it (the round used `clip_norm`)."""
        assert self.adaptive is not None and self.count_stddev is not None
        std = self.count_stddev  # the production cohort's count noise, scaled to the simulated one's mean
        if self.noise_cohort:
            std *= self.expected_cohort / self.noise_cohort
        share = noised_unclipped_fraction([c.metrics.get(UNCLIPPED_METRIC) for c in contributions],
                                          self.expected_cohort, std, self.secrets.noise, server_round)
        used, self.clip_norm = self.clip_norm, self.adaptive.next_clip_norm(self.clip_norm, share)
        return {"clip_norm": used, "clip_norm_next": self.clip_norm, "unclipped_share_noised": share,
                "user_adaptive_clipping": f"count noise sigma_b = {self.count_stddev:.4g}, accounted (update noise "
                                          f"multiplier {self.update_multiplier:.4g})"}

    def adaptive_note(self) -> str | None:
        """What the epsilon report says about adaptive clipping (None without it)."""
        if self.adaptive is None:
            return None
        return (f"adaptive clipping: count noise sigma_b = {self.count_stddev:.4g}, accounted (the update sum's noise "
                f"multiplier {self.update_multiplier:.4g} and the count's together are one Gaussian of z = "
                f"{self.noise_multiplier:.4g}: 1/z^2 = 1/z_update^2 + 1/(2 sigma_b)^2); target unclipped quantile "
                f"{self.adaptive.target_quantile:g}, learning rate {self.adaptive.learning_rate:g}, clip_norm now "
                f"{self.clip_norm:.4g}")

    def report(self) -> dict[str, Any]:
        rep = self.accountant.report()
        caveats = [c for c in (KNOWN_SEED_WARNING if self.secrets.from_seed else None, self.regime) if c]
        caveats += self.caveats
        adaptive = self.adaptive_note()
        text = str(rep) + "".join(f"; {c}" for c in (adaptive, *caveats) if c)
        return {"report": text, **rep.to_dict(), "target_epsilon": self.target_epsilon or None,
                "adaptive_clipping": adaptive, "clip_norm": self.clip_norm,
                "caveats": caveats,
                "covers": "the global adapter only: the per-device metric replies (a simulation instrument) are not "
                          "noised and are not covered by this epsilon"}

    def state(self, server_round: int, run_dir: Path) -> dict[str, Any]:
        out = self.inner.state(server_round, run_dir) | {"accountant": self.accountant.state(),
                                                         "clip_norm": self.clip_norm}  # the next round's C
        atomic_write(run_dir / PRIVACY_FILE, json.dumps(self.report(), indent=2, allow_nan=True).encode("utf-8"))
        return out

    def load_state(self, state: Mapping[str, Any], run_dir: Path) -> None:
        self.inner.load_state(state, run_dir)
        self.accountant = UserLevelAccountant.from_state(state["accountant"])
        self.clip_norm = float(state.get("clip_norm", self.clip_norm))  # adaptive clipping's C continues
