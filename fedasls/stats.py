"""Confidence intervals for means over devices (bootstrap percentile)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def mean_ci(
    values: Iterable[float | None],
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of `values` with a bootstrap percentile confidence interval: (mean, low, high).

    None and NaN values are dropped. With a single value the interval collapses to it.
    Raises ValueError when no finite value is left or an argument is out of range.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_ci: confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"mean_ci: n_boot must be >= 1, got {n_boot}")
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise ValueError("mean_ci: no values left after dropping None/NaN; pass at least one number")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    boot_means = arr[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot_means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)
