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
    acc = UserLevelAccountant(sigma, 1e-5, accountant="rdp")
    acc.compose(q, rounds)
    # dp-accounting also uses orders above 63, so it may be slightly lower, never meaningfully higher
    assert acc.epsilon() == pytest.approx(rdp_ref, abs=0.02) or acc.epsilon() < rdp_ref


def test_round_by_round_curve_matches_flowers_accountant_and_the_library_report():
    population, cohort, z, delta = 100_000, 100, 1.0, 1e-5
    ours = UserLevelAccountant(z, delta, accountant="rdp")  # Flower's accountant is RDP
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


def _library_pld(z: float, q: float, rounds: int, delta: float, relation) -> float:
    """dp-accounting's PLD epsilon, built here independently of fedasls."""
    import dp_accounting
    from dp_accounting import pld

    acc = pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z, q, rounds, delta", [(1.0, 1 / 6, 2, 1e-5), (1.1, 0.01, 300, 1e-6), (0.8, 0.05, 40, 1e-5)])
def test_both_relations_match_dp_accountings_pld_at_the_runs_own_z(z, q, rounds, delta):
    """Replace-one: the PLD accountant's REPLACE_ONE already models the 2C move, so z goes in unchanged
    (halving it counted the doubling twice: z = 1, q = 1/6, 2 rounds gave 9.76 instead of 2.95)."""
    from dp_accounting import NeighboringRelation

    for relation, name in ((NeighboringRelation.ADD_OR_REMOVE_ONE, "add/remove"),
                           (NeighboringRelation.REPLACE_ONE, "replace-one")):
        ours = UserLevelAccountant(z, delta, name)
        ours.compose(q, rounds)
        assert ours.epsilon() == pytest.approx(_library_pld(z, q, rounds, delta, relation), rel=1e-9)
        assert "dp-accounting PLD" in str(ours.report()) and name in str(ours.report())
    replace = UserLevelAccountant(1.0, 1e-5, "replace-one")
    replace.compose(1 / 6, 2)
    assert replace.epsilon() == pytest.approx(2.95, abs=0.01)


def test_replace_one_costs_more_than_add_remove_and_rdp_is_looser():
    add_remove, replace = UserLevelAccountant(1.0, 1e-5), UserLevelAccountant(1.0, 1e-5, "replace-one")
    rdp = UserLevelAccountant(1.0, 1e-5, accountant="rdp")
    for acc in (add_remove, replace, rdp):
        acc.compose(0.01, 200)
    assert replace.epsilon() > add_remove.epsilon() and rdp.epsilon() > add_remove.epsilon()
    with pytest.raises(ValueError, match="replace-one"):
        UserLevelAccountant(1.0, 1e-5, "replace-one", accountant="rdp")


@pytest.mark.parametrize("target, rounds, q, relation", [(2.0, 100, 0.01, "add/remove"), (8.0, 5, 0.2, "replace-one"),
                                                          (1.0, 1000, 0.001, "add/remove")])
def test_calibration_hits_the_target_epsilon_within_one_percent(target, rounds, q, relation):
    from fedasls.privacy.user_level import calibrate_noise_multiplier

    z = calibrate_noise_multiplier(target, 1e-5, rounds, q, relation)
    acc = UserLevelAccountant(z, 1e-5, relation)
    acc.compose(q, rounds)
    assert 0.99 * target <= acc.epsilon() <= target


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
