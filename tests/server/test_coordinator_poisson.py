"""The coordinator's Poisson sampling mode (user-level DP needs amplification it can prove)."""

from __future__ import annotations

import numpy as np
import pytest

from fedasls.sim.heterogeneity import HeterogeneityModel
from server.coordinator import Coordinator


def _poisson(population=2_000, cohort=40, availability="always", deadline=None, seed=0) -> Coordinator:
    return Coordinator(population, HeterogeneityModel(seed=0, availability=availability), cohort, 1.0, deadline, seed,
                       sampling="poisson")


def test_each_device_joins_independently_at_rate_q():
    coord = _poisson()
    assert coord.sample_rate == pytest.approx(0.02)
    counts, hits = [], np.zeros(2_000)
    for r in range(300):
        coord.round_index = r
        chosen = coord.sample(0.0)
        assert len(set(chosen)) == len(chosen)
        counts.append(len(chosen))
        hits[chosen] += 1
    # cohort size is Binomial(2000, 0.02): mean 40, variance 39.2 (not a fixed K)
    assert np.mean(counts) == pytest.approx(40, abs=1.5)
    assert np.var(counts) == pytest.approx(39.2, rel=0.3)
    # every device's participation rate is about q (no device is favoured)
    assert hits.mean() / 300 == pytest.approx(0.02, rel=0.05) and hits.max() / 300 < 0.06


def test_no_k_fastest_cut_every_on_time_finisher_completes():
    coord = _poisson(population=100, cohort=30, deadline=50.0, seed=3)
    chosen = coord.sample(0.0)
    durations = {d: float(i * 10) for i, d in enumerate(chosen)}
    out = coord.close_round(0.0, durations)
    on_time = [d for d in chosen if durations[d] <= 50.0]
    assert sorted(out.completed) == sorted(on_time) and len(out.completed) == 6
    assert sorted(out.stragglers) == sorted(set(chosen) - set(on_time))
    assert out.round_seconds == 50.0


def test_unavailable_devices_are_not_asked_and_state_restores_the_mode():
    coord = _poisson(population=5_000, cohort=500, availability="diurnal", seed=4)
    chosen = coord.sample(0.0)
    assert chosen and all(coord.heterogeneity.profile(d).availability.is_available(0.0) for d in chosen)
    back = Coordinator.from_state(coord.state(), coord.heterogeneity)
    assert back.sampling == "poisson" and back.sample(0.0) == coord.sample(0.0)
    empty = _poisson(population=10, cohort=1, seed=0)
    empty.pending = []
    assert empty.close_round(0.0, {}).round_seconds == 0.0
    with pytest.raises(ValueError, match="sampling"):
        Coordinator(10, HeterogeneityModel(seed=0), 2, sampling="uniform")
