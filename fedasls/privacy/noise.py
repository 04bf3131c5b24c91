"""Gaussian noise on the sum of clipped updates (DP-FedAvg, central DP) and its signal-to-noise ratio.

With each device's update clipped to L2 norm C, the sum has sensitivity C under add/remove-one
(2C under replace-one). The server adds N(0, (z C)^2) to every coordinate of the sum and divides
by the EXPECTED cohort (a public constant, not the realized count, so that dividing leaks nothing).
The noise is drawn from a generator seeded per (secret, round): the secret is the server's private
randomness (fedasls.privacy.secrets), so nobody holding the run's config and outputs can regenerate
the noise, while a resumed run (which restores the secret) adds the same noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedasls.privacy.clipping import clip, l2_norm
from fedasls.federated.fedavg import TensorDict, weighted_sum


def round_seed(secret: int, server_round: int, stream: str = "noise") -> int:
    """A 64-bit generator seed for one round, derived from the secret by SHA-256 (one-way: a round's
    seed reveals neither the secret nor another round's seed)."""
    digest = hashlib.sha256(f"{int(secret)}:{stream}:{int(server_round)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


def gaussian_like(template: Mapping[str, torch.Tensor], std: float, secret: int, server_round: int) -> TensorDict:
    """N(0, std^2) per coordinate, with the template's keys and shapes, from the round's seed of `secret`."""
    gen = torch.Generator().manual_seed(round_seed(secret, server_round))
    return {k: torch.randn(v.shape, generator=gen) * std for k, v in template.items()}


@dataclass(frozen=True)
class NoisedAggregate:
    mean: TensorDict  # (clipped sum + noise) / expected cohort
    clipped_sum: TensorDict  # before noise (never leaves the server's aggregation step)
    noise_std: float  # z * C, per coordinate of the sum
    contributors: int
    snr: float


def signal_to_noise(clipped_sum: Mapping[str, torch.Tensor], noise_std: float) -> float:
    """||clipped sum|| / E||noise|| = ||sum|| / (z C sqrt(d)); inf without noise, 0 without signal."""
    dims = sum(v.numel() for v in clipped_sum.values())
    expected_noise = noise_std * math.sqrt(dims)
    signal = l2_norm(clipped_sum)
    return math.inf if expected_noise == 0 else signal / expected_noise


def dp_fedavg(
    updates: Sequence[Mapping[str, torch.Tensor]],
    clip_norm: float,
    noise_multiplier: float,
    expected_cohort: float,
    secret: int,
    server_round: int,
    layout: Mapping[str, torch.Tensor] | None = None,
    noise_cohort: float | None = None,
) -> NoisedAggregate:
    """DP-FedAvg of device updates: re-clip each to C (devices already did; re-clipping is a no-op
    then and guarantees the bound), sum, add N(0, (z C)^2), divide by the expected cohort.

    With `noise_cohort` (a production cohort larger than the simulated one) the noise on the sum is
    scaled by expected_cohort / noise_cohort, so the mean carries the noise that cohort would get.

    A round without contributors still releases noise (on `layout`, the global adapter's tensors):
    under Poisson sampling an empty cohort is one of the outcomes the accountant covers."""
    if updates:
        total = weighted_sum([clip(u, clip_norm).update for u in updates])
    elif layout is not None:
        total = {k: torch.zeros(v.shape) for k, v in layout.items()}
    else:
        raise ValueError("dp_fedavg got no updates and no layout: pass layout= (the global adapter's tensors)")
    return noised_sum(total, len(updates), clip_norm, noise_multiplier, expected_cohort, secret, server_round,
                      noise_cohort=noise_cohort)


def noised_sum(
    total: Mapping[str, torch.Tensor],
    contributors: int,
    sensitivity: float,
    noise_multiplier: float,
    expected_cohort: float,
    secret: int,
    server_round: int,
    noise_cohort: float | None = None,
) -> NoisedAggregate:
    """DP-FedAvg of an already summed aggregate (`dp_fedavg` sums; SecAgg+ under DP hands the securely
    aggregated sum): add N(0, (z S)^2) per coordinate, S = the sum's L2 sensitivity (C, or C inflated
    by SecAgg+'s quantization: server/secagg.py `quantized_sensitivity`), divide by the expected cohort."""
    if not expected_cohort > 0:
        raise ValueError(f"expected cohort must be > 0, got {expected_cohort}")
    std = float(noise_multiplier) * float(sensitivity)
    if noise_cohort:
        std *= float(expected_cohort) / float(noise_cohort)
    noise = gaussian_like(total, std, secret, server_round)
    mean = {k: (total[k] + noise[k]) / float(expected_cohort) for k in total}
    return NoisedAggregate(mean, dict(total), std, contributors, signal_to_noise(total, std))
