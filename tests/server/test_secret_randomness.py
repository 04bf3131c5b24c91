"""DP randomness is secret: someone holding the run's config, code and released adapters cannot
regenerate the noise or predict the sample; the secret lives only in server-private.json (0600)
and a resume restores it exactly."""

from __future__ import annotations

import dataclasses
import json
import stat

import pytest
import torch

from fedasls.config import Settings
from fedasls.federated.fedavg import weighted_sum
from fedasls.federated.settings import FederatedSettings
from fedasls.federated.strategies import FedAvg
from fedasls.federated.strategy import Contribution
from fedasls.privacy.clipping import clip
from fedasls.privacy.dp_fedavg import DPFedAvg
from fedasls.privacy.noise import gaussian_like
from fedasls.privacy.secrets import DpSecrets
from fedasls.sim.heterogeneity import HeterogeneityModel
from server.coordinator import Coordinator
from server.private_state import PrivateStateError, dp_secrets, private_path
from fedasls.config import settings_toml

LAYOUT = {"layers.0.q_proj.lora_A.weight": (4, 16), "layers.0.q_proj.lora_B.weight": (16, 4)}
COHORT = 3.0


def _round(dp: DPFedAvg, inner: FedAvg, server_round: int) -> tuple[dict, dict]:
    """One DP round on seeded updates: (what the attacker sees released, the true clipped sum)."""
    before = {k: v.clone() for k, v in inner.adapter.items()}
    downlink = dp.configure_train(server_round, [0, 1, 2])
    contributions = []
    for d in range(3):
        gen = torch.Generator().manual_seed(10 * server_round + d)
        contributions.append(Contribution(d, {k: torch.randn(v.shape, generator=gen) * 0.05
                                              for k, v in downlink.shared.items()}, 1.0))
    dp.aggregate_train(server_round, contributions)
    released = {k: (inner.adapter[k] - before[k]) * COHORT for k in before}  # = clipped sum + noise
    true_sum = weighted_sum([clip(c.update, dp.clip_norm).update for c in contributions])
    return released, true_sum


def _best_recovery_error(released: dict, true_sum: dict, std: float, server_round: int, public: list[int]) -> float:
    """The attack: regenerate the noise from every public seed, both the old derivation
    (seed * 1_000_003 + round) and the current one, subtract, and keep the best match."""
    errors = []
    for seed in public:
        old = torch.Generator().manual_seed((seed * 1_000_003 + server_round) % (2**63))
        candidates = [{k: torch.randn(v.shape, generator=old) * std for k, v in released.items()},
                      gaussian_like(released, std, seed, server_round)]
        for noise in candidates:
            errors.append(max((released[k] - noise[k] - true_sum[k]).abs().max().item() for k in released))
    return min(errors)


def _dp(f: FederatedSettings, secrets: DpSecrets) -> tuple[DPFedAvg, FedAvg]:
    inner = FedAvg(f, LAYOUT, 4)
    return DPFedAvg(inner, f, sample_rate=0.3, expected_cohort=COHORT, secrets=secrets), inner


def test_the_noise_recovery_attack_recovers_nothing_by_default_and_everything_with_a_known_seed():
    settings = Settings.model_validate({"federated": {"strategy": "global", "dp": True, "noise_multiplier": 1.0,
                                                      "clip_norm": 0.5}, "simulation": {"sampling": "poisson"}})
    f = settings.federated
    public = sorted({f.seed, settings.heterogeneity.seed, settings.population.seed, *range(20)})
    std = f.noise_multiplier * f.clip_norm
    dp, inner = _dp(f, DpSecrets.fresh())
    for server_round in (1, 2):
        released, true_sum = _round(dp, inner, server_round)
        assert _best_recovery_error(released, true_sum, std, server_round, public) > std  # noise-sized error
    # the attack itself works: against a reproducible study whose noise_seed the attacker knows ...
    known = f.model_copy(update={"noise_seed": 7})
    dp, inner = _dp(known, DpSecrets.from_noise_seed(7))
    released, true_sum = _round(dp, inner, 1)
    leaked = DpSecrets.from_noise_seed(7).noise
    assert _best_recovery_error(released, true_sum, std, 1, [leaked]) < 1e-5  # ... the exact clipped sum
    assert "does NOT hold" in dp.report()["report"]


def test_two_runs_of_one_config_release_different_noise():
    f = FederatedSettings(strategy="global", dp=True, clip_norm=0.5, noise_multiplier=1.0)
    (a, inner_a), (b, inner_b) = _dp(f, DpSecrets.fresh()), _dp(f, DpSecrets.fresh())
    released_a, _ = _round(a, inner_a, 1)
    released_b, _ = _round(b, inner_b, 1)
    assert all(not torch.allclose(released_a[k], released_b[k]) for k in LAYOUT)


def test_the_secret_lives_only_in_a_private_file_outside_the_run_and_resume_restores_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDASLS_PRIVATE_DIR", str(tmp_path / "private"))
    settings = Settings.model_validate({"federated": {"strategy": "global", "dp": True},
                                        "simulation": {"sampling": "poisson"}})
    run = tmp_path / "results" / "run"
    secrets = dp_secrets(settings, run, resume=False)
    path = private_path(run)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.is_relative_to(run)  # nothing in the run folder holds it
    for file in run.rglob("*"):
        assert f"{secrets.noise:x}" not in file.read_text()
    assert dp_secrets(settings, run, resume=True) == secrets  # a resume continues with the same secrets
    hex_noise, decimal_noise = f"{secrets.noise:x}", str(secrets.noise)
    public = settings_toml(settings) + settings.model_dump_json()
    downlink = _dp(settings.federated, secrets)[0].configure_train(1, [0])
    public += json.dumps({k: v for k, v in dataclasses.asdict(downlink).items() if k != "shared"})
    assert hex_noise not in public and decimal_noise not in public
    assert dp_secrets(settings.model_copy(update={"federated": settings.federated.model_copy(update={"dp": False})}),
                      tmp_path / "other", resume=False) is None
    (run / "rounds.jsonl").write_text('{"round": 1}\n')
    path.unlink()
    with pytest.raises(PrivateStateError, match="private DP state.*is missing"):
        dp_secrets(settings, run, resume=True)


def test_the_dp_sample_comes_from_the_secret_and_is_not_in_the_public_state():
    hetero = HeterogeneityModel.from_settings(Settings().heterogeneity)

    def coordinator(secret: int | None) -> Coordinator:
        return Coordinator(population_size=10_000, heterogeneity=hetero, cohort_size=50, seed=0,
                           simulated_availability=False, sampling="poisson", sampling_secret=secret)

    public = coordinator(None).sample()
    first, again, other = coordinator(2**100 + 3).sample(), coordinator(2**100 + 3).sample(), coordinator(99).sample()
    assert first == again and first != public and first != other
    assert "sampling_secret" not in coordinator(2**100 + 3).state()
