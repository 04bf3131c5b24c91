"""Accountants: opacus reference values, dp-accounting user-level DP, one report format."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from opacus.accountants import RDPAccountant

from fedasls.privacy.accounting import PrivacyReport, example_level_epsilon, opacus_report, user_level_epsilon

DELTA = 1e-5
# (q, sigma, T, RDP epsilon, PRV upper epsilon) from PAPERS.md (opacus 1.6 maths).
REFERENCE = [
    (0.1, 1.0, 100, 7.90, 7.06),
    (0.01, 1.0, 500, 1.65, 1.34),
    (0.004267, 1.1, 14062, 2.60, 2.39),
]


def _gaussian_epsilon_by_hand(sigma: float, rounds: int, delta: float) -> float:
    """Epsilon of `rounds` unsampled Gaussians (sensitivity 1), RDP a*T/(2 sigma^2), converted with
    eps = min_a rdp + log((a-1)/a) - (log delta + log a)/(a-1) over dp-accounting's orders."""
    a = np.array(DEFAULT_RDP_ORDERS, dtype=float)
    rdp = rounds * a / (2 * sigma**2)
    return float(np.min(rdp + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)))


@pytest.mark.parametrize("q,sigma,steps,rdp_ref,prv_ref", REFERENCE)
def test_example_level_matches_reference_values(q, sigma, steps, rdp_ref, prv_ref):
    rdp = example_level_epsilon(sigma, q, steps, DELTA, "rdp")
    prv = example_level_epsilon(sigma, q, steps, DELTA, "prv")
    assert rdp.epsilon == pytest.approx(rdp_ref, abs=0.02)
    assert prv.epsilon == pytest.approx(prv_ref, abs=0.05)
    assert prv.epsilon < rdp.epsilon  # PRV is tighter than RDP
    for report in (rdp, prv):
        assert (report.sampling, report.neighbouring, report.level) == ("poisson", "add/remove", "example")
        assert (report.steps, report.noise_multiplier, report.sample_rate, report.delta) == (steps, sigma, q, DELTA)


@pytest.mark.parametrize("q,sigma,steps,rdp_ref,prv_ref", REFERENCE)
def test_user_level_poisson_agrees_with_opacus_on_reference_rows(q, sigma, steps, rdp_ref, prv_ref):
    # Same maths, two libraries. The optimum order here is fractional (< 63), where dp-accounting's
    # series is very slightly more conservative (7.904 vs 7.899 for the first row), so it is not <=.
    user = user_level_epsilon(sigma, q, steps, DELTA, "poisson")
    assert user.epsilon == pytest.approx(rdp_ref, abs=0.02)
    assert (user.sampling, user.neighbouring, user.level) == ("poisson", "add/remove", "user")


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 4.0, 100), (0.02, 5.0, 50)])
def test_dp_accounting_not_above_opacus_when_orders_beyond_63_matter(q, sigma, steps):
    opacus_acc = RDPAccountant()
    opacus_acc.history = [(sigma, q, steps)]
    with pytest.warns(UserWarning, match="largest alpha"):
        _, best_order = opacus_acc.get_privacy_spent(delta=DELTA)
    assert best_order == 63  # opacus is capped at its largest order here
    ours = user_level_epsilon(sigma, q, steps, DELTA, "poisson").epsilon
    theirs = example_level_epsilon(sigma, q, steps, DELTA, "rdp").epsilon
    assert ours < theirs - 0.01


def test_fixed_size_cohort_uses_replace_one_with_double_sensitivity():
    # A cohort of the whole population: no amplification, one Gaussian per round. Replace-one moves
    # the clipped sum by 2 * clip, so noise multiplier 1.0 acts like sigma 0.5 at sensitivity 1.
    report = user_level_epsilon(1.0, 1.0, 10, DELTA, "fixed", population=50)
    assert report.epsilon == pytest.approx(_gaussian_epsilon_by_hand(0.5, 10, DELTA), rel=1e-9)
    poisson_full = user_level_epsilon(1.0, 1.0, 10, DELTA, "poisson")
    assert poisson_full.epsilon == pytest.approx(_gaussian_epsilon_by_hand(1.0, 10, DELTA), rel=1e-9)

    fixed = user_level_epsilon(1.0, 0.1, 100, DELTA, "fixed", population=1000)
    assert fixed.sampling == "fixed-size without replacement"
    assert fixed.neighbouring == "replace-one"
    assert fixed.sample_rate == pytest.approx(0.1)
    assert math.isfinite(fixed.epsilon)
    assert fixed.epsilon > user_level_epsilon(1.0, 0.1, 100, DELTA, "poisson").epsilon
    text = str(fixed)
    assert "fixed-size without replacement" in text and "replace-one" in text
    assert "cohort 100 of 1000" in text and "noise_multiplier/2" in text


def test_more_noise_or_fewer_steps_means_smaller_epsilon():
    base = example_level_epsilon(1.0, 0.05, 200, DELTA).epsilon
    assert example_level_epsilon(2.0, 0.05, 200, DELTA).epsilon < base
    assert example_level_epsilon(1.0, 0.05, 100, DELTA).epsilon < base
    assert example_level_epsilon(1.0, 0.05, 0, DELTA).epsilon == 0.0
    assert example_level_epsilon(0.0, 0.05, 10, DELTA).epsilon == math.inf
    assert user_level_epsilon(0.0, 0.05, 10, DELTA).epsilon == math.inf


def test_report_string_and_dict_state_the_assumptions():
    reports = [
        example_level_epsilon(1.0, 0.1, 100, DELTA, "rdp"),
        example_level_epsilon(1.0, 0.1, 100, DELTA, "prv"),
        user_level_epsilon(1.0, 0.1, 100, DELTA, "poisson"),
        user_level_epsilon(1.0, 0.1, 100, DELTA, "fixed", population=500),
    ]
    for report in reports:
        text = str(report)
        assert f"epsilon = {report.epsilon:.4g}" in text
        assert "delta = 1e-05" in text
        assert f"sampling: {report.sampling}" in text
        assert f"neighbouring relation: {report.neighbouring}" in text
        data = report.to_dict()
        assert PrivacyReport(**data) == report
        assert {"epsilon", "delta", "sampling", "neighbouring", "level", "accountant"} <= data.keys()


def test_opacus_report_reads_an_engine_accountant():
    acc = RDPAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.2, sample_rate=0.25)
    report = opacus_report(acc, DELTA)
    assert report.steps == 30
    assert report.epsilon == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-12)
    acc.step(noise_multiplier=0.5, sample_rate=0.25)
    with pytest.raises(ValueError, match="mixes 2"):
        opacus_report(acc, DELTA)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="needs population"):
        user_level_epsilon(1.0, 0.1, 10, DELTA, "fixed")
    with pytest.raises(ValueError, match="delta"):
        example_level_epsilon(1.0, 0.1, 10, 0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        user_level_epsilon(1.0, 1.5, 10, DELTA)
    with pytest.raises(ValueError, match="accountant"):
        example_level_epsilon(1.0, 0.1, 10, DELTA, "gdp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cohort of 0"):
        user_level_epsilon(1.0, 0.001, 10, DELTA, "fixed", population=100)


def test_composed_epsilon_matches_one_run_and_grows_with_more_runs():
    from fedasls.privacy.accounting import composed_epsilon, example_level_epsilon

    one = composed_epsilon([(1.0, 0.1, 100)], 1e-5)
    assert one == pytest.approx(example_level_epsilon(1.0, 0.1, 100, 1e-5, "rdp").epsilon, rel=1e-9)
    two = composed_epsilon([(1.0, 0.1, 100), (1.0, 0.2, 50)], 1e-5)
    assert two > one
    assert composed_epsilon([], 1e-5) == 0.0
