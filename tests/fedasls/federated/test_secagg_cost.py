"""The Flower-free SecAgg+ cost model (hand-computed values) and the secure-aggregation settings checks."""

from __future__ import annotations

import pytest

from fedasls.config import Settings, poisson_slots, secagg_devices_per_round
from fedasls.federated.secagg_cost import neighbours, round_cost, shares_and_threshold


def test_shares_and_threshold_follow_flowers_rule():
    assert shares_and_threshold(5, 1.0, 0.67) == (5, 3)  # round(0.67 * 5) = 3
    assert shares_and_threshold(10, 0.5, 0.5) == (5, 2)  # round(5.0) = 5 (odd), max(round(2.5), 2) = 2
    assert shares_and_threshold(10, 0.4, 0.67) == (5, 3)  # 4 is even and below n: 5
    assert shares_and_threshold(4, 0.25, 1.0) == (4, 4)  # 1 share <= 2: every device
    assert shares_and_threshold(100, 7, 4) == (7, 4)  # integers as given
    assert neighbours(100, 7) == 7 and neighbours(5, 5) == 5 and neighbours(4, 4) == 4
    with pytest.raises(ValueError, match="at least 2"):
        shares_and_threshold(1, 1.0, 0.5)


def test_round_cost_by_hand():
    # n = 100, k = 7 neighbours (itself included), d = 1000, small made-up sizes to add up by hand:
    # public key 10, ciphertext 20, share 5, id 1, masked value 8, config 3, float32 download.
    c = round_cost(100, 1000, 7, 4, param_bytes=4, public_key_bytes=10, ciphertext_bytes=20, share_bytes=5,
                   id_bytes=1, masked_value_bytes=8, config_bytes=3)
    up = 2 * 10 + 6 * (20 + 1) + 1001 * 8 + 7 * (1 + 5)  # 20 + 126 + 8008 + 42
    down = 3 + 7 * 2 * 10 + 6 * (20 + 1) + 1000 * 4 + 7 * 1  # 3 + 140 + 126 + 4000 + 7
    assert (c.neighbours, c.threshold, c.messages_per_device) == (7, 4, 8)
    assert (c.bytes_up_per_device, c.bytes_down_per_device) == (up, down) == (8196, 4276)
    assert (c.server_messages, c.server_bytes_in, c.server_bytes_out) == (800, 100 * up, 100 * down)
    assert c.server_mask_expansions == 100 and c.plain_bytes_up_per_device == 4000
    # 3 devices drop after receiving stage 2: no masked vector or shares from them, no stage 3 to them,
    # and the server rebuilds their 6 pairwise masks each.
    d = round_cost(100, 1000, 7, 4, param_bytes=4, dropped=3, public_key_bytes=10, ciphertext_bytes=20,
                   share_bytes=5, id_bytes=1, masked_value_bytes=8, config_bytes=3)
    assert d.server_messages == 97 * 8 + 3 * 5
    assert d.server_bytes_in == 100 * up - 3 * (1001 * 8 + 7 * 6)
    assert d.server_bytes_out == 100 * down - 3 * 7
    assert d.server_mask_expansions == 97 + 3 * 6


def test_per_device_cost_grows_with_neighbours_not_the_cohort():
    small, large = round_cost(50, 10_000, 9, 5), round_cost(50_000, 10_000, 9, 5)
    assert small.bytes_up_per_device == large.bytes_up_per_device
    assert large.server_bytes_in == 1000 * small.server_bytes_in


def base(**federated) -> dict:
    return {"federated": {"strategy": "global", "secure_aggregation": "secagg+", **federated}}


@pytest.mark.parametrize("data, match", [
    ({"federated": {"secure_aggregation": "secagg+"}}, "needs strategy"),
    ({**base(dp=True, secagg_max_weight=50.5), "simulation": {"sampling": "poisson"}}, "secagg_max_weight = 50.5"),
    (base(secagg_num_shares=4), "must be odd"),
    (base(secagg_num_shares=2.0), r"in \(0, 1\]"),
    (base(secagg_reconstruction_threshold=7, secagg_num_shares=5), "below secagg_num_shares"),
    ({**base(), "simulation": {"cohort_size": 1, "overcommit": 1.0}}, "at least 2 devices"),
    ({**base(secagg_reconstruction_threshold=1.0), "simulation": {"cohort_size": 4, "overcommit": 1.5}},
     "fastest of 6 sampled"),
    ({**base(), "simulation": {"devices_per_worker": 2}}, "devices_per_worker = 1"),
])
def test_settings_refuse_combinations_secagg_cannot_run(data, match):
    with pytest.raises(ValueError, match=match):
        Settings.model_validate(data)


def test_default_secagg_settings_validate():
    f = Settings.model_validate(base()).federated
    assert (f.secagg_num_shares, f.secagg_reconstruction_threshold, f.secagg_max_weight) == (1.0, 0.67, 100.0)


def test_dp_on_secagg_validates_and_sizes_its_slots_for_the_poisson_cohort():
    data = {**base(dp=True), "population": {"num_devices": 1000},
            "simulation": {"sampling": "poisson", "cohort_size": 10}}
    s = Settings.model_validate(data)
    slots = secagg_devices_per_round(s)
    # P(Binomial(1000, 0.01) > slots) <= 1e-12 < P(... > slots - 1): the smallest such count, far above 13
    from scipy.stats import binom

    assert slots == poisson_slots(1000, 10, 1e-12)
    assert binom.sf(slots, 1000, 0.01) <= 1e-12 < binom.sf(slots - 1, 1000, 0.01)
    assert slots > 13  # more than ceil(cohort_size x overcommit) = ceil(10 x 1.3): a Poisson cohort is random
    looser = Settings.model_validate({**data, "federated": {**data["federated"], "secagg_slot_tail": 1e-3}})
    assert secagg_devices_per_round(looser) < slots
