"""User-level accountant: PAPERS.md reference values, an independent computation, resume, stop rule."""

from __future__ import annotations

import json

import pytest
from flwr.serverapp import RdpAccountant
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod

from fedasls.privacy.user_level import UserLevelAccountant
from fedasls.privacy.accounting import user_level_epsilon

REFERENCE = [  # PAPERS.md: Poisson-subsampled Gaussian, add/remove, opacus RDP (orders <= 63)
    (0.1, 1.0, 100, 7.90),
    (0.01, 1.0, 500, 1.65),
    (0.004267, 1.1, 14062, 2.60),
]


@pytest.mark.parametrize("q, sigma, rounds, rdp_ref", REFERENCE)
def test_matches_reference_values(q, sigma, rounds, rdp_ref):
    acc = UserLevelAccountant(sigma, 1e-5)
    acc.compose(q, rounds)
    # dp-accounting also uses orders above 63, so it may be slightly lower, never meaningfully higher
    assert acc.epsilon() == pytest.approx(rdp_ref, abs=0.02) or acc.epsilon() < rdp_ref


def test_round_by_round_curve_matches_flowers_accountant_and_the_library_report():
    population, cohort, z, delta = 100_000, 100, 1.0, 1e-5
    ours = UserLevelAccountant(z, delta)
    flower = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                         sampling_method=SamplingMethod.POISSON))
    for _ in range(50):
        ours.compose(cohort / population)
        flower.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=cohort, population_size=population))
    assert ours.epsilon() == pytest.approx(flower.get_epsilon(delta), rel=1e-9)
    assert ours.epsilon() == pytest.approx(user_level_epsilon(z, cohort / population, 50, delta).epsilon, rel=1e-9)
    # PAPERS.md: 1000 rounds of 100 of 100k at z=1 give ~0.68 under Poisson sampling
    ours.compose(cohort / population, 950)
    assert ours.epsilon() == pytest.approx(0.68, abs=0.03)


def test_replace_one_uses_half_the_multiplier_and_costs_more():
    add_remove, replace = UserLevelAccountant(1.0, 1e-5), UserLevelAccountant(1.0, 1e-5, "replace-one")
    half = UserLevelAccountant(0.5, 1e-5, "replace-one")
    for acc in (add_remove, replace):
        acc.compose(0.01, 200)
    assert replace.gaussian_multiplier == 0.5 and replace.epsilon() > add_remove.epsilon()
    assert "2*clip" in str(replace.report()) and "replace-one" in str(replace.report())
    half.compose(0.01, 200)
    assert half.epsilon() > replace.epsilon()


def test_state_round_trips_through_json_and_stop_rule_looks_ahead():
    acc = UserLevelAccountant(1.2, 1e-6)
    acc.compose(0.05, 3)
    acc.compose(0.05)
    acc.compose(0.02)
    assert acc.runs == [[0.05, 4], [0.02, 1]] and acc.rounds == 5
    back = UserLevelAccountant.from_state(json.loads(json.dumps(acc.state())))
    assert back.epsilon() == acc.epsilon()
    nxt = acc.epsilon_after(0.05)
    assert acc.would_exceed(nxt - 1e-9, 0.05) and not acc.would_exceed(nxt + 1e-9, 0.05)
    assert acc.epsilon() < nxt and acc.rounds == 5  # looking ahead changes nothing
    text = str(acc.report())
    for needed in ("delta = 1e-06", "sampling: poisson", "neighbouring relation: add/remove", "5 rounds"):
        assert needed in text


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="noise_multiplier"):
        UserLevelAccountant(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        UserLevelAccountant(1.0, 1.5)
    with pytest.raises(ValueError, match="neighbouring"):
        UserLevelAccountant(1.0, 1e-5, "swap")
    with pytest.raises(ValueError, match="sample rate"):
        UserLevelAccountant(1.0, 1e-5).compose(0.0)
