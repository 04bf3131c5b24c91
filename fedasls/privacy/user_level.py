"""User-level (device-level) privacy accounting of DP-FedAvg rounds, as the server really ran them.

One record = one device's whole data. Each round the server releases (sum of clipped updates +
N(0, (z C)^2)) / expected cohort, with devices joining by Poisson sampling at rate q. The
accountant composes one Poisson-subsampled Gaussian event per round with dp-accounting:

- the PLD accountant (the default: a tight upper bound, value discretization 1e-3) under either
  neighbouring relation: "add/remove" (a device is in the population or not, sensitivity C) or
  "replace-one" (one device's data swapped for another's: the sum moves by up to 2C, which
  dp-accounting's PLD REPLACE_ONE already models, so the Gaussian multiplier stays z);
- the RDP accountant (orders 1.1..63 and 128..1024; 15-25% looser here), add/remove only:
  dp-accounting's RDP does not cover Poisson sampling under replace-one.

`calibrate_noise_multiplier` finds the smallest z whose epsilon after the planned rounds stays at
or below a target (bisection on the same accountant), as pfl-research calibrates its mechanisms.

Its state is the list of composed (q, rounds) runs: JSON-able, and replaying it gives the same
epsilon exactly, so a resumed run continues the same curve. Every report states delta, the
sampling assumption and the neighbouring relation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import dp_accounting
from dp_accounting import pld, rdp

from fedasls.privacy.accounting import ADD_REMOVE, POISSON, REPLACE_ONE, PrivacyReport

Neighbouring = Literal["add/remove", "replace-one"]
PLD_DISCRETIZATION = 1e-3  # 10x faster than 1e-4; epsilon differs in the 5th digit (8.14116 vs 8.14112)
SAMPLING_NOTE = (
    "Poisson sampling: each device joins a round independently with probability q; unavailable devices "
    "are not asked (availability is public and independent of device data); no K-fastest cut; "
    "aggregate = (clipped sum + noise) / expected cohort"
)


def _quiet_absl() -> tuple[logging.Logger, int]:
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)  # dp-accounting logs non-converging fractional orders near 1
    return logger, level


AccountantName = Literal["pld", "rdp"]
_RELATIONS = {ADD_REMOVE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
              REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE}


@lru_cache(maxsize=1024)
def _epsilon(noise_multiplier: float, delta: float, neighbouring: str, accountant: str,
             runs: tuple[tuple[float, int], ...]) -> float:
    """Epsilon of Poisson-subsampled Gaussian runs (cached: the stop rule and the report ask twice a round).
    z is relative to the clip norm C; each accountant's own neighbouring relation models the sensitivity."""
    if not runs:
        return 0.0
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    logger, level = _quiet_absl()
    try:
        if accountant == "rdp":
            acc: Any = rdp.RdpAccountant(neighboring_relation=_RELATIONS[neighbouring])
        else:
            acc = pld.PLDAccountant(neighboring_relation=_RELATIONS[neighbouring],
                                    value_discretization_interval=PLD_DISCRETIZATION)
        for q, n in runs:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, gaussian), n)
        return float(acc.get_epsilon(delta))
    finally:
        logger.setLevel(level)


@dataclass
class UserLevelAccountant:
    """Composes one Poisson-subsampled Gaussian per DP-FedAvg round; epsilon at a fixed delta."""

    noise_multiplier: float
    delta: float
    neighbouring: Neighbouring = ADD_REMOVE
    runs: list[list[float]] = field(default_factory=list)  # [[q, rounds], ...] in order
    accountant: AccountantName = "pld"

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(
                f"user-level DP needs a noise multiplier > 0, got {self.noise_multiplier!r} ([federated] noise_multiplier)"
            )
        if not (0.0 < self.delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r} ([federated] delta; below 1/population)")
        if self.neighbouring not in (ADD_REMOVE, REPLACE_ONE):
            raise ValueError(f"neighbouring must be '{ADD_REMOVE}' or '{REPLACE_ONE}', got {self.neighbouring!r}")
        if self.accountant not in ("pld", "rdp"):
            raise ValueError(f"accountant must be 'pld' or 'rdp', got {self.accountant!r}")
        if self.accountant == "rdp" and self.neighbouring == REPLACE_ONE:
            raise ValueError("the RDP accountant does not cover Poisson sampling under replace-one; use accountant "
                             "'pld' ([federated] accountant)")

    @property
    def rounds(self) -> int:
        return int(sum(n for _, n in self.runs))

    def _epsilon_of(self, runs: list[list[float]]) -> float:
        return _epsilon(self.noise_multiplier, self.delta, self.neighbouring, self.accountant,
                        tuple((float(q), int(n)) for q, n in runs))

    @staticmethod
    def _with(runs: list[list[float]], q: float, rounds: int) -> list[list[float]]:
        out = [list(r) for r in runs]
        if out and out[-1][0] == q:
            out[-1][1] += rounds
        else:
            out.append([float(q), int(rounds)])
        return out

    def compose(self, sample_rate: float, rounds: int = 1) -> None:
        """Account `rounds` released aggregates at Poisson rate `sample_rate`."""
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r}")
        self.runs = self._with(self.runs, float(sample_rate), int(rounds))

    def epsilon(self) -> float:
        return self._epsilon_of(self.runs)

    def epsilon_after(self, sample_rate: float, rounds: int = 1) -> float:
        """Epsilon if `rounds` more rounds at `sample_rate` were released (state unchanged)."""
        return self._epsilon_of(self._with(self.runs, float(sample_rate), int(rounds)))

    def would_exceed(self, target_epsilon: float, sample_rate: float) -> bool:
        """True if one more round would push epsilon above `target_epsilon` (stop before it)."""
        return self.epsilon_after(sample_rate) > target_epsilon

    def report(self) -> PrivacyReport:
        qs = sorted({q for q, _ in self.runs})
        accountant = ("dp-accounting RDP (orders 1.1..63, 128..1024)" if self.accountant == "rdp"
                      else "dp-accounting PLD (upper bound, value discretization 1e-3)")
        notes = SAMPLING_NOTE
        if self.neighbouring == REPLACE_ONE:
            notes += "; replace-one: the sum moves by up to 2*clip, as dp-accounting's PLD REPLACE_ONE models"
        return PrivacyReport(
            epsilon=self.epsilon(),
            delta=self.delta,
            mechanism="Poisson-subsampled Gaussian (DP-FedAvg, device updates clipped on the device)",
            accountant=accountant,
            sampling=POISSON,
            neighbouring=self.neighbouring,
            level="user",
            steps=self.rounds,
            noise_multiplier=self.noise_multiplier,
            sample_rate=qs[-1] if qs else 0.0,
            notes=notes if len(qs) <= 1 else f"{notes}; sample rates {qs}",
        )

    def state(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "delta": self.delta, "neighbouring": self.neighbouring,
                "accountant": self.accountant, "runs": [list(r) for r in self.runs]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "UserLevelAccountant":
        return cls(float(state["noise_multiplier"]), float(state["delta"]), state["neighbouring"],
                   [[float(q), int(n)] for q, n in state["runs"]], state.get("accountant", "rdp"))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int, sample_rate: float,
                               neighbouring: Neighbouring = ADD_REMOVE, accountant: AccountantName = "pld") -> float:
    """The smallest noise multiplier z whose epsilon after `rounds` Poisson rounds at `sample_rate` is at
    most `target_epsilon` (within 0.5% below it), by bisection on the accountant itself."""
    if not target_epsilon > 0 or rounds < 1:
        raise ValueError(f"calibration needs a target epsilon > 0 and rounds >= 1, got {target_epsilon!r}, {rounds!r}")

    def eps(z: float) -> float:
        acc = UserLevelAccountant(z, delta, neighbouring, accountant=accountant)
        acc.compose(sample_rate, rounds)
        return acc.epsilon()

    low, high = 1e-3, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon} in {rounds} rounds")
    for _ in range(60):
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
        if eps(high) >= 0.995 * target_epsilon:
            break
    return high
