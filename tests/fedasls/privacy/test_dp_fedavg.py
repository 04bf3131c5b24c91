"""A global strategy and its DP-FedAvg wrapper in a plain Python loop: no Flower, no model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fedasls.federated.fedavg import add, weighted_sum
from fedasls.federated.settings import FederatedSettings
from fedasls.federated.strategies import FedAvg
from fedasls.federated.strategy import AGGREGATE, Contribution, Downlink
from fedasls.privacy.clipping import clip
from fedasls.privacy.dp_fedavg import DPFedAvg, summed_contribution
from fedasls.privacy.noise import gaussian_like
from fedasls.privacy.secrets import DpSecrets

LAYOUT = {"layers.0.q_proj.lora_A.weight": (4, 8), "layers.0.q_proj.lora_B.weight": (8, 4)}


def updates(downlink: Downlink, server_round: int, devices: Sequence[int]) -> list[Contribution]:
    """Seeded device updates of the downlink's layout, some above the clipping bound."""
    out = []
    for d in devices:
        gen = torch.Generator().manual_seed(100 * server_round + d)
        update = {k: torch.randn(v.shape, generator=gen) * (0.1 * (d + 1)) for k, v in downlink.shared.items()}
        out.append(Contribution(d, update, float(d + 1)))
    return out


def test_a_global_strategy_and_its_dp_wrapper_run_in_a_plain_loop():
    f = FederatedSettings(strategy="global", dp=True, clip_norm=0.5, noise_multiplier=0.8, seed=3,
                          release_diagnostics=True)
    plain, inner = FedAvg(f, LAYOUT, 4), FedAvg(f, LAYOUT, 4)
    dp = DPFedAvg(inner, f, sample_rate=0.25, expected_cohort=3.0, secrets=DpSecrets(noise=3, sampling=4))
    for server_round in (1, 2, 3):
        before = {k: v.clone() for k, v in inner.adapter.items()}
        downlink = dp.configure_train(server_round, [0, 1, 2])
        assert downlink.clip_norm == 0.5 and list(downlink.shared) == list(LAYOUT)
        got = updates(downlink, server_round, [0, 1, 2])
        metrics = dp.aggregate_train(server_round, got)
        # exactly DP-FedAvg: unweighted sum of clipped updates + N(0, (zC)^2) from the secret, / expected cohort
        total = weighted_sum([clip(c.update, 0.5).update for c in got])
        noise = gaussian_like(total, 0.8 * 0.5, 3, server_round)
        expected = add(before, {k: (total[k] + noise[k]) / 3.0 for k in total})
        assert all(torch.allclose(inner.adapter[k], expected[k], atol=1e-6) for k in expected)
        assert metrics["contributors"] == 3 and metrics["user_epsilon"] > 0
        assert "not covered by epsilon" in metrics["diagnostics_note"]
        assert metrics["user_accountant"] == "pld" and metrics["user_sampling"] == "poisson q=0.25"
        plain.aggregate_train(server_round, updates(plain.configure_train(server_round, [0, 1, 2]), server_round,
                                                    [0, 1, 2]))
    assert dp.accountant.rounds == 3
    assert any(not torch.allclose(plain.adapter[k], inner.adapter[k], atol=1e-3) for k in LAYOUT)  # noise, weights


class Recorder:
    """A minimal strategy of the protocol (not a FedAvg): what does a wrapper hand it?"""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[list[Contribution]] = []

    def stop_reason(self) -> str | None:
        return "the inner strategy is done" if len(self.seen) >= 2 else None

    def configure_train(self, server_round: int, devices: Sequence[int]) -> Downlink:
        return Downlink("global", False, 4, 0, 9.0, {k: torch.zeros(s) for k, s in LAYOUT.items()})

    def aggregate_train(self, server_round: int, contributions: Sequence[Contribution]) -> dict[str, float]:
        self.seen.append(list(contributions))
        return {"contributors": len(contributions)}

    def state(self, server_round: int, run_dir: Path) -> dict:
        return {"name": self.name}

    def load_state(self, state, run_dir: Path) -> None:
        return None


def test_dp_wraps_the_protocol_not_a_concrete_class(tmp_path):
    f = FederatedSettings(strategy="global", dp=True, clip_norm=0.5, noise_multiplier=1.0)
    inner = Recorder()
    dp = DPFedAvg(inner, f, sample_rate=0.5, expected_cohort=2.0, secrets=DpSecrets.fresh())
    downlink = dp.configure_train(1, [0, 1])
    assert downlink.clip_norm == 0.5  # devices clip to the wrapper's bound, not the inner strategy's 9.0
    dp.aggregate_train(1, updates(downlink, 1, [0, 1]))
    dp.aggregate_train(2, [])  # nobody contributed: the wrapper still releases (and accounts) noise
    assert [len(s) for s in inner.seen] == [1, 1] and all(s[0].device_id == AGGREGATE for s in inner.seen)
    assert dp.stop_reason() == "the inner strategy is done"
    assert dp.state(2, tmp_path)["accountant"] and (tmp_path / "privacy.json").is_file()


def test_by_default_a_dp_round_releases_no_statistic_of_the_clipped_sum():
    """The contributor count and the SNR come from the clipped sum before noise: off unless asked for."""
    f = FederatedSettings(strategy="global", dp=True, clip_norm=0.5, noise_multiplier=0.8)
    dp = DPFedAvg(FedAvg(f, LAYOUT, 4), f, sample_rate=0.25, expected_cohort=3.0, secrets=DpSecrets.fresh())
    metrics = dp.aggregate_train(1, updates(dp.configure_train(1, [0, 1, 2]), 1, [0, 1, 2]))
    assert "snr" not in metrics and "contributors" not in metrics
    for key in ("user_epsilon", "user_delta", "user_sampling", "user_neighbouring", "user_accountant"):
        assert key in metrics  # every epsilon written states delta, sampling, relation and accountant


def test_a_presummed_aggregate_gets_the_same_noise_scaled_to_its_sensitivity():
    """SecAgg+ under DP hands the wrapper the sum of the clipped updates (summed_contribution): the
    result is the plain path's, with the same secret draw scaled from C to the sum's sensitivity."""
    f = FederatedSettings(strategy="global", dp=True, clip_norm=0.5, noise_multiplier=0.8, release_diagnostics=True)
    secrets = DpSecrets(noise=11, sampling=12)
    plain_inner, summed_inner = FedAvg(f, LAYOUT, 4), FedAvg(f, LAYOUT, 4)
    plain = DPFedAvg(plain_inner, f, sample_rate=0.25, expected_cohort=3.0, secrets=secrets)
    summed = DPFedAvg(summed_inner, f, sample_rate=0.25, expected_cohort=3.0, secrets=secrets)
    start = {k: v.clone() for k, v in plain_inner.adapter.items()}
    got = updates(plain.configure_train(1, [0, 1, 2]), 1, [0, 1, 2])
    summed.configure_train(1, [0, 1, 2])
    total = weighted_sum([clip(c.update, 0.5).update for c in got])
    a = plain.aggregate_train(1, got)
    b = summed.aggregate_train(1, [summed_contribution(total, 3, 0.5)])
    assert all(torch.allclose(plain_inner.adapter[k], summed_inner.adapter[k], atol=1e-6) for k in LAYOUT)
    assert a["contributors"] == b["contributors"] == 3 and a["user_epsilon"] == b["user_epsilon"]
    # a larger sensitivity (SecAgg+'s quantization) scales the same draw
    inflated_inner = FedAvg(f, LAYOUT, 4)
    inflated = DPFedAvg(inflated_inner, f, sample_rate=0.25, expected_cohort=3.0, secrets=secrets)
    inflated.configure_train(1, [0, 1, 2])
    inflated.aggregate_train(1, [summed_contribution(total, 3, 0.6)])
    noise = gaussian_like(total, 1.0, 11, 1)
    for k in LAYOUT:
        assert torch.allclose(inflated_inner.adapter[k], start[k] + (total[k] + 0.8 * 0.6 * noise[k]) / 3.0, atol=1e-6)
    # a sensitivity below C is never trusted: the noise stays at z C
    low_inner = FedAvg(f, LAYOUT, 4)
    low = DPFedAvg(low_inner, f, sample_rate=0.25, expected_cohort=3.0, secrets=secrets)
    low.configure_train(1, [0, 1, 2])
    low.aggregate_train(1, [summed_contribution(total, 3, 0.1)])
    assert all(torch.allclose(low_inner.adapter[k], plain_inner.adapter[k], atol=1e-6) for k in LAYOUT)
