"""Adaptive clipping (Andrew et al. 2021) in DP-FedAvg, in a plain Python loop: the clip norm follows
the update norms' quantile, the count noise is secret and accounted, and the state resumes exactly."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting import pld
from pydantic import ValidationError

from fedasls.config import Settings
from fedasls.device.global_round import ClippedUpdate
from fedasls.device.round import unclipped_bit
from fedasls.federated.fedavg import add, weighted_sum
from fedasls.federated.settings import FederatedSettings
from fedasls.federated.strategies import FedAvg
from fedasls.federated.strategy import Contribution, Downlink
from fedasls.privacy.adaptive_clipping import count_noise
from fedasls.privacy.clipping import clip, l2_norm
from fedasls.privacy.dp_fedavg import DPFedAvg
from fedasls.privacy.noise import gaussian_like, round_seed
from fedasls.privacy.secrets import DpSecrets

LAYOUT = {"layers.0.q_proj.lora_A.weight": (4, 8), "layers.0.q_proj.lora_B.weight": (8, 4)}


def settings(**extra) -> FederatedSettings:
    return FederatedSettings(**{"strategy": "global", "dp": True, "adaptive_clipping": True, "clip_norm": 1.0,
                                "noise_multiplier": 1.0, "clipped_count_stddev": 2.0, **extra})


def wrapper(f: FederatedSettings, secrets: DpSecrets, cohort: float = 4.0, q: float = 0.25) -> tuple[DPFedAvg, FedAvg]:
    inner = FedAvg(f, LAYOUT, 4)
    return DPFedAvg(inner, f, sample_rate=q, expected_cohort=cohort, secrets=secrets), inner


def device_round(downlink: Downlink, norms: list[float], server_round: int) -> list[Contribution]:
    """Devices whose raw updates have these L2 norms: each clips to the downlink's C and reports its bit
    with the device's own function (fedasls.device.round.unclipped_bit), as its reply would carry it."""
    out = []
    for d, target in enumerate(norms):
        gen = torch.Generator().manual_seed(1000 * server_round + d)
        raw = {k: torch.randn(v.shape, generator=gen) for k, v in downlink.shared.items()}
        scale = target / l2_norm(raw)
        clipped = clip({k: v * scale for k, v in raw.items()}, downlink.clip_norm)
        bit = unclipped_bit(downlink, ClippedUpdate(clipped.update, clipped.norm, clipped.factor, 10))
        out.append(Contribution(d, clipped.update, 10.0, {"unclipped": bit}))
    return out


def run(dp: DPFedAvg, rounds: range, norms: list[float]) -> list[float]:
    """The clip norm each round used."""
    used = []
    for r in rounds:
        downlink = dp.configure_train(r, list(range(len(norms))))
        assert downlink.report_unclipped  # devices are asked for their bit
        used.append(downlink.clip_norm)
        row = dp.aggregate_train(r, device_round(downlink, norms, r))
        assert row["clip_norm"] == used[-1] and row["clip_norm_next"] == dp.clip_norm  # C is released per round
        assert row["user_adaptive_clipping"].startswith("count noise sigma_b = ")  # beside each epsilon
    return used


def test_the_clip_norm_falls_toward_norms_below_it_and_tracks_the_median():
    # every device's update has norm 0.3, C0 = 1, gamma 0.5: all unclipped, so C falls each round...
    dp, _ = wrapper(settings(clipped_count_stddev=1.0, noise_multiplier=1.9), DpSecrets.fresh(), cohort=20.0, q=0.01)
    used = run(dp, range(1, 11), [0.3] * 20)
    assert all(b < a for a, b in zip(used, used[1:])), used
    assert used[-1] < 0.45  # about exp(-0.2 * 0.5 * 9) = 0.41
    # ... and settles near the norms: once C is below 0.3 every update is clipped and C rises again
    used = run(dp, range(11, 31), [0.3] * 20)
    assert 0.2 < sum(used[-10:]) / 10 < 0.45, used
    # norms spread over 0.1..1.0: C settles near their median (0.55), as gamma = 0.5 asks
    dp, _ = wrapper(settings(clipped_count_stddev=1.0, noise_multiplier=1.9), DpSecrets.fresh(), cohort=20.0, q=0.01)
    norms = [0.1 + 0.9 * i / 19 for i in range(20)]
    used = run(dp, range(1, 41), norms)
    assert 0.4 < sum(used[-15:]) / 15 < 0.7, used[-15:]


def test_a_higher_target_quantile_keeps_a_higher_clip_norm():
    norms = [0.1 + 0.9 * i / 19 for i in range(20)]
    secrets = DpSecrets.fresh()
    low, _ = wrapper(settings(clipped_count_stddev=1.0, noise_multiplier=1.9, target_unclipped_quantile=0.2), secrets, cohort=20.0, q=0.01)
    high, _ = wrapper(settings(clipped_count_stddev=1.0, noise_multiplier=1.9, target_unclipped_quantile=0.9), secrets, cohort=20.0, q=0.01)
    assert sum(run(low, range(1, 26), norms)[-10:]) < sum(run(high, range(1, 26), norms)[-10:])


def test_the_update_noise_is_raised_and_epsilon_is_pld_at_the_effective_multiplier():
    f = settings(delta=1e-5)
    secrets = DpSecrets(noise=5, sampling=6)
    dp, inner = wrapper(f, secrets)
    sigma_b, z = 2.0, 1.0
    z_update = dp.update_multiplier
    assert z_update > z  # the update sum gets more noise so that sum and count together account as z
    for r in (1, 2, 3):
        before = {k: v.clone() for k, v in inner.adapter.items()}
        downlink = dp.configure_train(r, [0, 1, 2, 3])
        c = downlink.clip_norm
        got = device_round(downlink, [0.5, 1.5, 2.0, 0.2], r)
        dp.aggregate_train(r, got)
        total = weighted_sum([g.update for g in got])  # the noise actually added has std z_update * C
        noise = gaussian_like(total, z_update * c, secrets.noise, r)
        want = add(before, {k: (total[k] + noise[k]) / 4.0 for k in total})
        assert all(torch.allclose(inner.adapter[k], want[k], atol=1e-6) for k in want)
    # independently: the two Gaussian queries (sum: sensitivity C, noise z_update C; centred count:
    # sensitivity 1/2, noise sigma_b) are one Gaussian of multiplier (z_update^-2 + (2 sigma_b)^-2)^-1/2
    z_eff = 1.0 / math.sqrt(1.0 / z_update**2 + 1.0 / (2 * sigma_b) ** 2)

    def library(multiplier: float) -> float:
        acc = pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                                value_discretization_interval=1e-3)
        acc.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(multiplier)), 3)
        return float(acc.get_epsilon(1e-5))

    assert dp.accountant.epsilon() == pytest.approx(library(z_eff), rel=1e-6)
    assert dp.accountant.epsilon() > 1.05 * library(z_update)  # the count is accounted, not free
    report = dp.report()
    assert "adaptive clipping: count noise sigma_b = 2, accounted" in report["report"]
    assert report["noise_multiplier"] == pytest.approx(z_eff, rel=1e-9)


def test_the_count_noise_comes_from_the_secret_apart_from_the_update_noise():
    norms = [0.5, 0.8, 1.2, 0.3]
    f = settings(noise_multiplier=0.5)
    runs = []
    for secrets in (DpSecrets.fresh(), DpSecrets.fresh(), DpSecrets(noise=9, sampling=1), DpSecrets(noise=9, sampling=1)):
        dp, _ = wrapper(f, secrets)
        runs.append(run(dp, range(1, 4), norms) + [dp.clip_norm])
    assert runs[0][1:] != runs[1][1:]  # two runs of one config release different clip norms
    assert runs[2] == runs[3]  # the same secret (a resume) gives the same count noise
    # its own stream of the secret: not the update noise's first draw for that round
    update_first = torch.randn(1, generator=torch.Generator().manual_seed(round_seed(9, 1))).item()
    assert count_noise(1.0, 9, 1) != pytest.approx(update_first)
    assert count_noise(1.0, 9, 1) != count_noise(1.0, 9, 2)


def test_the_clip_norm_is_checkpointed_and_a_resume_continues_exactly(tmp_path):
    f = settings()
    secrets = DpSecrets.fresh()
    norms = [0.4, 0.6, 0.9, 0.2]
    dp, inner = wrapper(f, secrets)
    run(dp, range(1, 4), norms)
    state = dp.state(3, tmp_path)
    assert state["clip_norm"] == dp.clip_norm != 1.0
    resumed, resumed_inner = wrapper(f, secrets)
    resumed.load_state(state, tmp_path)
    assert resumed.clip_norm == dp.clip_norm and resumed.accountant.rounds == 3
    assert run(resumed, range(4, 6), norms) == run(dp, range(4, 6), norms)
    assert resumed.clip_norm == dp.clip_norm
    assert all(torch.equal(resumed_inner.adapter[k], inner.adapter[k]) for k in LAYOUT)


def test_without_adaptive_clipping_nothing_changes():
    f = FederatedSettings(strategy="global", dp=True, clip_norm=0.7, noise_multiplier=1.0)
    dp, _ = wrapper(f, DpSecrets.fresh())
    downlink = dp.configure_train(1, [0, 1])
    assert not downlink.report_unclipped and dp.update_multiplier == 1.0
    row = dp.aggregate_train(1, device_round(downlink, [0.2, 2.0], 1))
    assert "clip_norm_next" not in row and dp.clip_norm == 0.7 and dp.report()["adaptive_clipping"] is None
    assert unclipped_bit(downlink, None) is None  # and devices send no bit


def test_bad_adaptive_clipping_settings_say_what_to_fix():
    with pytest.raises(ValidationError, match="needs dp = true"):
        FederatedSettings(strategy="global", adaptive_clipping=True)
    with pytest.raises(ValidationError, match="secagg"):
        FederatedSettings(strategy="global", dp=True, adaptive_clipping=True, secure_aggregation="secagg+")
    with pytest.raises(ValidationError, match="raise it above 0.5"):
        FederatedSettings(strategy="global", dp=True, adaptive_clipping=True, clipped_count_stddev=0.4)
    # the default sigma_b = expected cohort / 20 (0.5 for a cohort of 10) is too small for z = 1: said when the
    # settings load, and (a calibrated z, or a strategy built by hand) when the wrapper is built
    run_settings = {"federated": {"strategy": "global", "dp": True, "adaptive_clipping": True},
                    "simulation": {"sampling": "poisson", "cohort_size": 10}, "population": {"num_devices": 40}}
    with pytest.raises(ValidationError, match="clipped_count_stddev above 0.5"):
        Settings.model_validate(run_settings)
    run_settings["simulation"]["cohort_size"] = 40  # sigma_b = 2
    assert Settings.model_validate(run_settings).federated.adaptive_clipping
    with pytest.raises(ValueError, match="clipped_count_stddev above 0.5"):
        wrapper(settings(clipped_count_stddev=None), DpSecrets.fresh(), cohort=4.0)
    assert wrapper(settings(clipped_count_stddev=None), DpSecrets.fresh(), cohort=100.0)[0].count_stddev == 5.0


def test_a_production_cohort_s_count_noise_is_simulated_and_accounted_at_its_size():
    """noise_cohort_size: sigma_b defaults to that cohort / 20 and the simulated share carries the noise
    a production cohort's share would (sigma_b / noise_cohort), as the update's mean does."""
    f = settings(clipped_count_stddev=None, noise_cohort_size=1000, noise_population_size=1_000_000)
    secrets = DpSecrets(noise=21, sampling=2)
    dp, _ = wrapper(f, secrets)  # a simulated cohort of 4 (its own default sigma_b, 0.2, would be refused)
    assert dp.count_stddev == 50.0 and dp.update_multiplier == pytest.approx((1 - 1 / 100**2) ** -0.5)
    downlink = dp.configure_train(1, [0, 1, 2])
    row = dp.aggregate_train(1, device_round(downlink, [0.5, 0.7, 2.0], 1))  # bits 1, 1, 0
    want = 0.5 + (0.5 + 0.5 - 0.5 + count_noise(50.0 * 4 / 1000, 21, 1)) / 4
    assert row["unclipped_share_noised"] == pytest.approx(want, rel=1e-12)
    assert "sigma_b = 50, accounted" in dp.report()["report"]


def test_a_calibrated_z_is_the_accounted_one_and_the_update_noise_follows_it():
    f = settings(calibrate_epsilon=4.0)
    dp, _ = wrapper(f, DpSecrets.fresh())
    z = dp.noise_multiplier
    assert 3.9 < dp.accountant.epsilon_after(0.25, 1) <= 4.0  # planned rounds = 1
    assert dp.update_multiplier == pytest.approx((z**-2 - 4.0**-2) ** -0.5)
