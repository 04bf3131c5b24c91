"""Privacy accountants and the one report format every epsilon is shown in.

Example-level DP (DP-SGD on one device, opacus) and user-level DP (DP-FedAvg on the global
adapter, dp-accounting) both end in a `PrivacyReport` whose text always states epsilon, delta,
the sampling assumption and the neighbouring relation: an epsilon without them is meaningless.

Noise convention (both levels): `noise_multiplier` = noise std / clipping norm, as in opacus and
DP-FedAvg. Under add/remove-one the clipped sum has L2 sensitivity = clip, so the Gaussian's
multiplier is `noise_multiplier`. Under replace-one (fixed-size cohorts) one record can move the
sum by up to 2 * clip, so the accountant is given `noise_multiplier / 2` (see `user_level_epsilon`).
"""

from __future__ import annotations

from collections.abc import Sequence

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import dp_accounting
from dp_accounting import rdp as dp_rdp
from opacus.accountants import PRVAccountant, RDPAccountant

POISSON = "poisson"
FIXED_WOR = "fixed-size without replacement"
ADD_REMOVE = "add/remove"
REPLACE_ONE = "replace-one"


@dataclass(frozen=True)
class PrivacyReport:
    """One (epsilon, delta) guarantee with the assumptions it holds under."""

    epsilon: float
    delta: float
    mechanism: str
    accountant: str
    sampling: str  # "poisson" | "fixed-size without replacement"
    neighbouring: str  # "add/remove" | "replace-one"
    level: str  # "example" | "user"
    steps: int
    noise_multiplier: float
    sample_rate: float
    notes: str = ""

    def __str__(self) -> str:
        unit = "steps" if self.level == "example" else "rounds"
        text = (
            f"epsilon = {self.epsilon:.4g}, delta = {self.delta:.3g} ({self.level}-level DP; "
            f"{self.mechanism}, noise multiplier {self.noise_multiplier:g}, sample rate {self.sample_rate:.4g}, "
            f"{self.steps} {unit}; sampling: {self.sampling}; neighbouring relation: {self.neighbouring}; "
            f"accountant: {self.accountant})"
        )
        return f"{text} [{self.notes}]" if self.notes else text

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (epsilon may be `inf` when there is no noise)."""
        return asdict(self)


def _check_common(noise_multiplier: float, sample_rate: float, steps: int, delta: float, what: str) -> None:
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"{what}: steps/rounds must be an int >= 0, got {steps!r}")
    if not (0.0 < delta < 1.0):
        raise ValueError(f"{what}: delta must be in (0, 1), got {delta!r} (typical: 1e-5 or below 1/population)")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"{what}: sample_rate must be in (0, 1], got {sample_rate!r} (batch size / dataset size)")
    if not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"{what}: noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


_OPACUS_NAMES = {
    "rdp": "opacus RDP (orders 1.1..63)",
    "prv": "opacus PRV (upper bound, eps_error 0.01)",
}


@lru_cache(maxsize=4096)
def _opacus_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Cached: opacus' RDP maths for fractional orders costs ~0.5 s a call, and devices repeat inputs."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    acc: RDPAccountant | PRVAccountant = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        return float(acc.get_epsilon(delta=delta))


def example_level_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Literal["rdp", "prv"] = "rdp",
) -> PrivacyReport:
    """Epsilon of DP-SGD with Poisson sampling (add/remove-one), from opacus' RDP or PRV accountant.

    RDP uses opacus' default orders (up to 63); PRV reports opacus' upper bound on epsilon.
    """
    _check_common(noise_multiplier, sample_rate, steps, delta, "example_level_epsilon")
    if accountant not in _OPACUS_NAMES:
        raise ValueError(f"example_level_epsilon: accountant must be 'rdp' or 'prv', got {accountant!r}")
    epsilon = _opacus_epsilon(accountant, float(noise_multiplier), float(sample_rate), int(steps), float(delta))
    return PrivacyReport(
        epsilon=epsilon,
        delta=delta,
        mechanism="subsampled Gaussian (DP-SGD)",
        accountant=_OPACUS_NAMES[accountant],
        sampling=POISSON,
        neighbouring=ADD_REMOVE,
        level="example",
        steps=steps,
        noise_multiplier=float(noise_multiplier),
        sample_rate=float(sample_rate),
    )


def opacus_report(accountant: RDPAccountant | PRVAccountant, delta: float) -> PrivacyReport:
    """Report for an opacus accountant that tracked a DP-SGD run (e.g. `PrivacyEngine.accountant`).

    Its history must hold one (noise_multiplier, sample_rate) setting, as one training run does.
    """
    kind = {RDPAccountant: "rdp", PRVAccountant: "prv"}.get(type(accountant))
    if kind is None:
        raise ValueError(
            f"opacus_report: expected an opacus RDPAccountant or PRVAccountant, got {type(accountant).__name__}"
        )
    settings = {(float(s), float(q)) for s, q, _ in accountant.history}
    if len(settings) > 1:
        raise ValueError(
            f"opacus_report: the accountant mixes {len(settings)} (noise, sample rate) settings; "
            "report each training run separately"
        )
    steps = sum(int(n) for _, _, n in accountant.history)
    sigma, q = settings.pop() if settings else (0.0, 1.0)
    return example_level_epsilon(sigma, q, steps, delta, kind)  # same history -> same epsilon


def composed_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Example-level epsilon of several DP-SGD runs over the same device data, composed by opacus'
    RDP accountant: `history` holds one (noise_multiplier, sample_rate, steps) per run (Poisson
    sampling, add/remove-one). 0.0 for no runs."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta))


def user_level_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    sampling: Literal["poisson", "fixed"] = "poisson",
    population: int | None = None,
) -> PrivacyReport:
    """Epsilon of DP-FedAvg on the global adapter (one user = one record), via dp-accounting RDP.

    - sampling="poisson": each device joins a round independently with probability `sample_rate`;
      PoissonSampledDpEvent(GaussianDpEvent(noise_multiplier)), add/remove-one relation.
    - sampling="fixed": a cohort of exactly round(sample_rate * population) devices drawn without
      replacement (Flower's sampling); SampledWithoutReplacementDpEvent, replace-one relation
      (Wang, Balle & Kasiviswanathan 2019, Thm 27). The population size is treated as public, and
      the Gaussian is given noise_multiplier / 2 because replacing one user moves the clipped sum
      by up to 2 * clip.
    """
    _check_common(noise_multiplier, sample_rate, rounds, delta, "user_level_epsilon")
    notes = ""
    if sampling == "poisson":
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        sampling_name, neighbouring = POISSON, ADD_REMOVE
        sigma = float(noise_multiplier)
        q = float(sample_rate)
        event: dp_accounting.DpEvent = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    elif sampling == "fixed":
        if population is None or population < 1:
            raise ValueError(
                "user_level_epsilon(sampling='fixed') needs population=<number of devices> (>= 1) "
                f"to size the cohort; got {population!r}"
            )
        cohort = round(sample_rate * population)
        if cohort < 1:
            raise ValueError(
                f"user_level_epsilon: sample_rate {sample_rate} x population {population} rounds to a cohort of 0; "
                "raise sample_rate or population"
            )
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        sampling_name, neighbouring = FIXED_WOR, REPLACE_ONE
        sigma = float(noise_multiplier) / 2.0
        q = cohort / population
        event = dp_accounting.SampledWithoutReplacementDpEvent(population, cohort, dp_accounting.GaussianDpEvent(sigma))
        notes = (
            f"cohort {cohort} of {population} devices per round (population size public); "
            "replace-one sensitivity 2*clip, so the accountant uses noise_multiplier/2"
        )
    else:
        raise ValueError(f"user_level_epsilon: sampling must be 'poisson' or 'fixed', got {sampling!r}")

    if rounds == 0:
        epsilon = 0.0
    elif noise_multiplier == 0.0:
        epsilon = math.inf
    else:
        # dp-accounting (absl) logs fractional orders near 1 whose series does not converge and
        # drops them from the minimum; harmless, so keep them out of the run's log.
        logger = logging.getLogger("absl")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            accountant = dp_rdp.RdpAccountant(neighboring_relation=relation)
            accountant.compose(event, rounds)
            epsilon = float(accountant.get_epsilon(delta))
        finally:
            logger.setLevel(level)
    return PrivacyReport(
        epsilon=epsilon,
        delta=delta,
        mechanism="subsampled Gaussian (DP-FedAvg, clipped device updates)",
        accountant="dp-accounting RDP (orders 1.1..63, 128..1024)",
        sampling=sampling_name,
        neighbouring=neighbouring,
        level="user",
        steps=rounds,
        noise_multiplier=float(noise_multiplier),
        sample_rate=q,
        notes=notes,
    )
