"""Flower-free aggregation maths: FedAvg, HetLoRA ranks, FedSA/FFA splits, clipping, DP noise."""

from __future__ import annotations

import math

import pytest
import torch

from fedasls.privacy.clipping import clip, l2_norm
from fedasls.federated.fedavg import add, fedavg, subtract, weighted_sum
from fedasls.federated.init import global_shapes, initial_global
from fedasls.privacy.noise import dp_fedavg, signal_to_noise
from fedasls.federated.ranks import pad, rank_of, truncate
from fedasls.federated.split import personal_part, shared_part

A, B = "layer.q_proj.lora_A.weight", "layer.q_proj.lora_B.weight"


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_heterogeneous_rank_round_by_hand():
    global_adapter = {A: t([[1, 2, 3], [4, 5, 6]]), B: t([[1, 0], [0, 1]])}  # rank 2: A (2, 3), B (2, 2)
    small = truncate(global_adapter, 1)
    assert torch.equal(small[A], t([[1, 2, 3]])) and torch.equal(small[B], t([[1], [0]]))
    assert rank_of(small) == 1 and list(small) == [A, B]
    # device 1 (rank 1) and device 2 (rank 2) send updates; device 1's is zero-padded to rank 2
    up1 = pad({A: t([[1, 1, 1]]), B: t([[2], [2]])}, 2)
    assert torch.equal(up1[A], t([[1, 1, 1], [0, 0, 0]])) and torch.equal(up1[B], t([[2, 0], [2, 0]]))
    up2 = {A: t([[1, 0, 0], [0, 2, 0]]), B: t([[0, 4], [4, 0]])}
    mean = fedavg([up1, up2], weights=[1, 3])
    assert torch.allclose(mean[A], t([[1, 0.25, 0.25], [0, 1.5, 0]]))
    assert torch.allclose(mean[B], t([[0.5, 3], [3.5, 0]]))
    new = add(global_adapter, mean)
    assert torch.allclose(new[A], t([[2, 2.25, 3.25], [4, 6.5, 6]]))
    assert torch.allclose(new[B], t([[1.5, 3], [3.5, 1]]))
    assert list(new) == [A, B]


def test_layout_mismatches_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="pad every reply"):
        fedavg([{A: torch.zeros(2, 3)}, {A: torch.zeros(1, 3)}])
    with pytest.raises(ValueError, match="same order"):
        weighted_sum([{A: torch.zeros(1, 3), B: torch.zeros(2, 1)}, {B: torch.zeros(2, 1), A: torch.zeros(1, 3)}])
    with pytest.raises(ValueError, match="larger rank"):
        truncate({A: torch.zeros(1, 3)}, 2)
    with pytest.raises(ValueError, match="above the global"):
        pad({A: torch.zeros(4, 3)}, 2)
    with pytest.raises(ValueError, match="not a LoRA"):
        pad({"layer.q_proj.weight": torch.zeros(2, 2)}, 2)


def test_splits_fedsa_shares_a_ffa_shares_b():
    state = {A: torch.ones(1, 3), B: torch.ones(2, 1)}
    assert list(shared_part(state, "all")) == [A, B]
    assert list(shared_part(state, "A")) == [A] and list(personal_part(state, "A")) == [B]
    assert list(shared_part(state, "B")) == [B] and list(personal_part(state, "B")) == [A]


def test_initial_global_is_seeded_and_truncates_consistently():
    template = {A: torch.zeros(2, 16), B: torch.zeros(8, 2)}  # a rank-2 device's layout
    shapes = global_shapes(template, 4)
    assert shapes == {A: (4, 16), B: (8, 4)}
    g1, g2, other = initial_global(shapes, 7), initial_global(shapes, 7), initial_global(shapes, 8)
    assert torch.equal(g1[A], g2[A]) and not torch.equal(g1[A], other[A])
    assert torch.count_nonzero(g1[B]) == 0 and g1[A].abs().max() <= 1 / math.sqrt(16)
    # a rank-2 device and the server agree on the first two rows of A
    assert torch.equal(truncate(g1, 2)[A], g1[A][:2])


def test_clipping_bounds_each_devices_contribution():
    big = {A: torch.full((2, 3), 10.0), B: torch.full((4, 2), -10.0)}
    small = {A: torch.full((2, 3), 0.01), B: torch.zeros(4, 2)}
    c = clip(big, 1.0)
    assert c.norm == pytest.approx(math.sqrt(14 * 100)) and l2_norm(c.update) == pytest.approx(1.0)
    assert clip(small, 1.0).factor == 1.0 and torch.equal(clip(small, 1.0).update[A], small[A])
    # one device can move the clipped sum by at most C, whatever it sends (add/remove-one sensitivity)
    others = [{A: torch.randn(2, 3), B: torch.randn(4, 2)} for _ in range(5)]
    base = dp_fedavg(others, 1.0, 0.0, 1.0, secret=0, server_round=1).clipped_sum
    with_big = dp_fedavg(others + [big], 1.0, 0.0, 1.0, secret=0, server_round=1).clipped_sum
    assert l2_norm(subtract(with_big, base)) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="clip norm"):
        clip(big, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip({A: torch.tensor([[math.nan]])}, 1.0)


def test_noised_aggregate_differs_from_fedavg_by_the_expected_scale():
    gen = torch.Generator().manual_seed(0)
    updates = [{A: torch.randn(40, 100, generator=gen) * 1e-3, B: torch.randn(50, 40, generator=gen) * 1e-3}
               for _ in range(8)]
    clip_norm, z, cohort = 0.5, 1.3, 8.0
    plain = fedavg(updates)  # all norms are below C, so clipping changes nothing here
    assert all(l2_norm(u) < clip_norm for u in updates)
    noised = dp_fedavg(updates, clip_norm, z, cohort, secret=3, server_round=2)
    diff = torch.cat([(noised.mean[k] - plain[k]).flatten() for k in plain]) * cohort
    assert diff.mean().abs() < 0.05 * z * clip_norm
    assert diff.std().item() == pytest.approx(z * clip_norm, rel=0.03)  # 6000 coordinates
    again = dp_fedavg(updates, clip_norm, z, cohort, secret=3, server_round=2)
    assert all(torch.equal(again.mean[k], noised.mean[k]) for k in plain)  # seeded: resume adds the same noise
    other_round = dp_fedavg(updates, clip_norm, z, cohort, secret=3, server_round=3)
    assert not torch.equal(other_round.mean[A], noised.mean[A])
    assert noised.snr == pytest.approx(l2_norm(noised.clipped_sum) / (z * clip_norm * math.sqrt(6000)))


def test_empty_round_releases_noise_only_and_snr_edges():
    layout = {A: torch.zeros(3, 4)}
    agg = dp_fedavg([], 1.0, 2.0, 4.0, secret=0, server_round=1, layout=layout)
    assert agg.contributors == 0 and agg.snr == 0.0 and agg.mean[A].abs().sum() > 0
    with pytest.raises(ValueError, match="layout"):
        dp_fedavg([], 1.0, 2.0, 4.0, secret=0, server_round=1)
    assert signal_to_noise(layout | {A: torch.ones(3, 4)}, 0.0) == math.inf
