"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").

Each round every device clips its update to the round's C and reports one bit, b = 1 if its update's
norm was at most C (unclipped) else 0. The server releases a noised estimate of the unclipped fraction

    f~ = 1/2 + (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m        (m: the expected cohort, public)

and moves C geometrically toward the gamma-quantile of the update norms:

    C <- C * exp(-eta_C * (f~ - gamma)).

The bits are centred (b - 1/2): adding or removing one device moves the centred sum by 1/2, whatever
the (secret, Poisson-random) realized cohort size, and E[f~] is still the unclipped fraction since the
realized cohort averages m. (The paper's fixed-size cohort can use the plain count; under Poisson
sampling the realized size is private, so it cannot be added back.) A sampled device that sends no
update adds 0 (neutral).

Accounting. The update sum (sensitivity C, noise z_update C) and the centred count (sensitivity 1/2,
noise sigma_b) are released together: scaled to unit noise they form one Gaussian mechanism whose
records lie in a ball of radius sqrt(1/z_update^2 + 1/(2 sigma_b)^2), i.e. one Gaussian of multiplier

    1/z^2 = 1/z_update^2 + 1/(2 sigma_b)^2                       (the paper's Theorem 1)

under add/remove (and under replace-one the ball's diameter doubles, as for the sum alone, which
dp-accounting's REPLACE_ONE models). As in the paper and Flower's
`DifferentialPrivacyServerSideAdaptiveClipping`, [federated] noise_multiplier is that accounted z;
the update noise is raised to z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2), which needs z < 2 sigma_b.
C itself is a function of the noised releases only, so publishing it costs nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedasls.privacy.noise import round_seed

COUNT_STREAM = "clipped-count"  # the count noise's derivation from the secret, apart from the update noise's
UNCLIPPED_METRIC = "unclipped"  # the device's bit in its reply (wire.messages.METRIC_RULES)


def default_count_stddev(cohort: float) -> float:
    """sigma_b = cohort / 20, the paper's suggestion (the count noise's std; cohort: expected devices a round)."""
    return float(cohort) / 20.0


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """z_update such that the update sum and the count together account as one Gaussian of multiplier `z`."""
    if not z < 2 * count_stddev:
        raise ValueError(
            f"adaptive clipping: the count noise sigma_b = {count_stddev:g} is too small for the noise multiplier "
            f"z = {z:g}: the count alone would spend the budget of z (it needs z < 2 sigma_b = {2 * count_stddev:g}). "
            f"Fix: set [federated] clipped_count_stddev above {z / 2:g} (e.g. {z:g}, which raises the update noise by "
            "15%; the default, the expected cohort / 20, is small for a small simulated cohort), or lower "
            "noise_multiplier")
    return (z ** -2 - (2 * count_stddev) ** -2) ** -0.5


def effective_noise_multiplier(z_update: float, count_stddev: float) -> float:
    """The multiplier of the one Gaussian the update sum (z_update) and the centred count (sigma_b) make."""
    return (z_update ** -2 + (2 * count_stddev) ** -2) ** -0.5


def count_noise(std: float, secret: int, server_round: int) -> float:
    """N(0, std^2) for the round's count, from the secret's own stream (independent of the update noise)."""
    gen = torch.Generator().manual_seed(round_seed(secret, server_round, COUNT_STREAM))
    return float(torch.randn(1, generator=gen, dtype=torch.float64).item()) * std


def noised_unclipped_fraction(bits: Iterable[int | None], expected_cohort: float, std: float, secret: int,
                              server_round: int) -> float:
    """1/2 + (sum (b - 1/2) + N(0, std^2)) / m. A missing bit (None) adds 0; any other value than 0 or 1 is
    refused (the guard already refuses it on the device)."""
    total = 0.0
    for b in bits:
        if b is None:
            continue
        if b not in (0, 1):
            raise ValueError(f"an unclipped bit must be 0 or 1, got {b!r}")
        total += float(b) - 0.5
    return 0.5 + (total + count_noise(std, secret, server_round)) / float(expected_cohort)


@dataclass(frozen=True)
class AdaptiveClipping:
    """The clip-norm update rule: target unclipped quantile gamma, learning rate eta_C."""

    target_quantile: float
    learning_rate: float

    def next_clip_norm(self, clip_norm: float, unclipped_fraction: float) -> float:
        """C * exp(-eta_C (f~ - gamma)): fewer unclipped than gamma raises C, more lowers it."""
        return float(clip_norm * math.exp(-self.learning_rate * (unclipped_fraction - self.target_quantile)))
