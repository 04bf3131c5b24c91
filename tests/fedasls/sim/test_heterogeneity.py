"""Device tiers, deterministic profiles, availability windows, FedScale import, cost model."""

from __future__ import annotations

import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fedasls.sim.availability import DAY_SECONDS, AvailabilityError, DailyAvailability
from fedasls.sim.cost_model import CostModel
from fedasls.sim.fedscale_traces import FedScaleTraceError, load_fedscale_traces
from fedasls.sim.heterogeneity import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_TIERS,
    DeviceProfile,
    HeterogeneityError,
    HeterogeneityModel,
    HeterogeneitySettings,
    buffer_bytes_for_storage,
    lora_rank_for_memory,
)

H = 3600.0


def _in_windows(av: DailyAvailability, t: float) -> bool:
    tod = t % av.period_s
    return any(s <= tod < e for s, e in av.windows)


def test_tiers_follow_default_and_custom_mix():
    n = 5000
    counts = Counter(HeterogeneityModel(seed=1).profile(i).tier for i in range(n))
    for name, tier in DEFAULT_TIERS.items():
        assert abs(counts[name] / n - tier.share) < 0.03, (name, counts)
    custom = Counter(HeterogeneityModel(seed=2, tier_mix={"low": 3, "high": 1}).profile(i).tier for i in range(n))
    assert custom["mid"] == 0
    assert abs(custom["low"] / n - 0.75) < 0.03
    assert abs(custom["high"] / n - 0.25) < 0.03


def test_memory_and_storage_map_to_rank_and_buffer():
    assert [lora_rank_for_memory(m) for m in (2000, 4095, 4096, 8191, 8192, 16000)] == [4, 4, 8, 8, 16, 16]
    assert buffer_bytes_for_storage(16, DEFAULT_BUFFER_BYTES) == 8192
    assert buffer_bytes_for_storage(32, DEFAULT_BUFFER_BYTES) == 16384
    assert buffer_bytes_for_storage(64, DEFAULT_BUFFER_BYTES) == 32768
    assert buffer_bytes_for_storage(16.7, DEFAULT_BUFFER_BYTES) == 8448  # 8550.4 bytes rounded down to 256
    assert buffer_bytes_for_storage(16, 65536) == 32768 and buffer_bytes_for_storage(64, 65536) == 131072
    model = HeterogeneityModel(seed=0)
    expected_rank = {"low": 4, "mid": 8, "high": 16}
    for i in range(300):
        p = model.profile(i)
        assert p.max_lora_rank == expected_rank[p.tier]
        assert p.buffer_bytes(16384) == buffer_bytes_for_storage(p.storage_mb, 16384)
        # selection.buffer_bytes is a mid-tier device's budget; the others scale with their storage
        assert p.buffer_bytes(65536) == buffer_bytes_for_storage(p.storage_mb, 65536)
        assert abs(p.buffer_bytes(65536) - 4 * p.buffer_bytes(16384)) < 4 * 256  # each rounded down to 256 bytes
        tier = DEFAULT_TIERS[p.tier]
        assert 0.9 * tier.storage_mb <= p.storage_mb <= 1.1 * tier.storage_mb
        assert p.compute_speed > 0 and p.bandwidth_mbps > 0


def test_profiles_are_deterministic_and_independent_of_order_and_population():
    a = HeterogeneityModel(seed=7)
    first = [a.profile(i) for i in (5, 999_999, 42)]
    b = HeterogeneityModel(seed=7)
    for i in range(100):  # generate others first: must not change device 42
        b.profile(i + 1000)
    assert [b.profile(i) for i in (5, 999_999, 42)] == first
    c = HeterogeneityModel(seed=8)
    assert c.profile(5) != first[0]
    assert DeviceProfile.from_dict(first[1].to_dict()) == first[1]
    assert pickle.loads(pickle.dumps(a)).profile(42) == first[2]  # picklable for worker processes
    with pytest.raises(HeterogeneityError, match="device_id"):
        a.profile(-1)


def test_availability_windows_hand_checked():
    av = DailyAvailability([(22 * H, 30 * H), (12 * H, 13 * H)])  # night window wraps midnight
    assert av.windows == ((0.0, 6 * H), (12 * H, 13 * H), (22 * H, 24 * H))
    assert [av.is_available(t * H) for t in (23, 2, 12.5, 10, 13, 6, 5.99)] == [True, True, True, False, False, False, True]
    assert av.is_available(3 * DAY_SECONDS + 1 * H)
    assert av.next_change(0) == 6 * H
    assert av.next_change(6 * H) == 12 * H
    assert av.next_change(12.5 * H) == 13 * H
    assert av.next_change(13 * H) == 22 * H
    assert av.next_change(23 * H) == DAY_SECONDS + 6 * H  # on across midnight: no change at 24 h
    assert av.next_change(2 * DAY_SECONDS + 7 * H) == 2 * DAY_SECONDS + 12 * H
    assert av.available_fraction() == pytest.approx(9 / 24)
    assert DailyAvailability.from_dict(av.to_dict()) == av
    assert math.isinf(DailyAvailability.always().next_change(5.0))
    assert DailyAvailability.always().is_available(123456.0)
    never = DailyAvailability([])
    assert not never.is_available(10.0) and math.isinf(never.next_change(10.0))
    # merged overlapping windows; a window at midnight that does not wrap flips at 0
    av2 = DailyAvailability([(0, 2 * H), (1 * H, 3 * H)])
    assert av2.windows == ((0.0, 3 * H),)
    assert av2.next_change(23 * H) == DAY_SECONDS
    with pytest.raises(AvailabilityError, match="ends before"):
        DailyAvailability([(5.0, 1.0)])


def test_generated_availability_agrees_with_windows_and_next_change():
    model = HeterogeneityModel(seed=3)
    rng = np.random.default_rng(0)
    for i in range(60):
        av = model.profile(i).availability
        assert 0.2 < av.available_fraction() < 0.6  # night charging + short daytime windows
        for t in rng.uniform(0, 3 * DAY_SECONDS, size=40):
            state = av.is_available(t)
            assert state == _in_windows(av, t)
            nxt = av.next_change(t)
            assert t < nxt <= t + DAY_SECONDS
            for u in np.linspace(t, nxt, 7)[:-1]:
                assert av.is_available(u) == state  # no change before next_change
            assert av.is_available(nxt + 1e-3) != state  # it does change there (1 ms after, float-safe)


def _write(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def test_fedscale_traces_load_and_map(tmp_path: Path):
    cap = _write(tmp_path / "capacity.pkl", {
        3: {"computation": 400.0, "communication": 2000.0},
        1: {"computation": 100.0, "communication": 5000.0},
        2: {"computation": 200.0, "communication": 20000.0},
    })
    beh = _write(tmp_path / "behave.pkl", {
        1: {"active": [0, 1000], "inactive": [500, 1500], "finish_time": 2000, "duration": 2000},
        2: {"active": [100], "inactive": [], "finish_time": 1000},  # last active lasts to finish_time
    })
    traces = load_fedscale_traces(cap, beh)
    assert traces.capacity_clients == [1, 2, 3]
    assert traces.capacity(4) == (2, 1.0, 20.0)
    model = HeterogeneityModel(seed=0, fedscale_path=cap, fedscale_behavior_path=beh)
    # device i -> client i mod 3 (sorted ids 1, 2, 3); speed = median ms / ms; kbps / 1000
    expected = {0: (2.0, 5.0, "high"), 1: (1.0, 20.0, "mid"), 2: (0.5, 2.0, "low"), 3: (2.0, 5.0, "high")}
    for device, (speed, mbps, tier) in expected.items():
        p = model.profile(device)
        assert (p.compute_speed, p.bandwidth_mbps, p.tier) == (pytest.approx(speed), pytest.approx(mbps), tier)
    a0, a1 = model.profile(0).availability, model.profile(1).availability  # clients 1 and 2
    assert a0.period_s == 2000 and a0.windows == ((0.0, 500.0), (1000.0, 1500.0))
    assert a0.is_available(100) and not a0.is_available(700) and a0.is_available(2100) and a0.is_available(5200)
    assert a1.windows == ((100.0, 1000.0),) and not a1.is_available(50) and a1.is_available(999)
    assert model.profile(2).availability == a0  # device 2 -> behaviour client 1 (2 mod 2 = 0)
    only_behaviour = HeterogeneityModel(seed=0, fedscale_behavior_path=beh)
    assert only_behaviour.profile(1).availability == a1
    assert only_behaviour.profile(1).tier in DEFAULT_TIERS


@pytest.mark.parametrize(
    "content, match",
    [
        ({1: {"computation": 10.0}}, r"client 1 is missing key 'communication'"),
        ({1: [1, 2]}, r"client 1 must map to a dict"),
        ([1, 2, 3], r"expected a non-empty dict"),
        ({}, r"expected a non-empty dict"),
        ({"a": {"computation": "fast", "communication": 1.0}}, r"client 'a' key 'computation' must be a number"),
        ({1: {"computation": 0.0, "communication": 1.0}}, r"'computation' must be finite and > 0"),
    ],
)
def test_malformed_capacity_pickles_raise_clear_errors(tmp_path: Path, content, match):
    path = _write(tmp_path / "cap.pkl", content)
    with pytest.raises(FedScaleTraceError, match=match) as err:
        load_fedscale_traces(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"active": [0], "inactive": [5]}, r"missing key 'finish_time'"),
        ({"active": [10], "inactive": [5], "finish_time": 100}, r"inactive at 5 before it becomes active at 10"),
        ({"active": [0], "inactive": [1, 2, 3], "finish_time": 100}, r"1 'active' but 3 'inactive'"),
        ({"active": 5, "inactive": [], "finish_time": 100}, r"'active' must be a list"),
    ],
)
def test_malformed_behaviour_pickles_raise_clear_errors(tmp_path: Path, entry, match):
    path = _write(tmp_path / "beh.pkl", {7: entry})
    with pytest.raises(FedScaleTraceError, match=match) as err:
        load_fedscale_traces(None, path)
    assert str(path) in str(err.value) and "client 7" in str(err.value)


def test_unreadable_or_unsafe_trace_files(tmp_path: Path):
    missing = tmp_path / "nope.pkl"
    with pytest.raises(FedScaleTraceError, match="not found"):
        load_fedscale_traces(missing)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(FedScaleTraceError, match="garbage.pkl: not a readable FedScale pickle"):
        load_fedscale_traces(garbage)
    unsafe = _write(tmp_path / "unsafe.pkl", {1: {"computation": Path("x"), "communication": 1.0}})
    with pytest.raises(FedScaleTraceError, match="refusing to load"):
        load_fedscale_traces(unsafe)
    with pytest.raises(FedScaleTraceError, match="needs a capacity_path"):
        load_fedscale_traces(None, None)


def test_settings_validate_and_build_model(tmp_path: Path):
    s = HeterogeneitySettings(seed=4, tier_mix={"low": 1.0}, dropout_scale=2.0)
    model = HeterogeneityModel.from_settings(s)
    p = model.profile(11)
    assert p.tier == "low" and p.dropout_prob == pytest.approx(2 * DEFAULT_TIERS["low"].dropout_prob)
    with pytest.raises(ValidationError, match="unknown tier"):
        HeterogeneitySettings(tier_mix={"ultra": 1.0})
    with pytest.raises(ValidationError, match="sum to > 0"):
        HeterogeneitySettings(tier_mix={"low": 0.0})
    with pytest.raises(ValidationError, match="extra"):
        HeterogeneitySettings(tiers="low")
    always = HeterogeneityModel.from_settings(HeterogeneitySettings(availability="always"))
    assert all(always.profile(i).availability.is_available(t) for i in range(20) for t in (0.0, 40_000.0))


def _profile(speed: float, mbps: float, rank: int = 8) -> DeviceProfile:
    return DeviceProfile(0, "mid", speed, mbps, rank, 0.0, DailyAvailability.always())


def test_cost_model_hand_computed_and_monotone():
    cm = CostModel()
    ref = _profile(1.0, 20.0)
    assert cm.train_seconds(ref, 10, 2, 8) == pytest.approx(20 * 0.08 * 1.08)
    assert cm.embed_seconds(ref, 50) == pytest.approx(1.0)
    assert cm.eval_seconds(ref, 4) == pytest.approx(1.0)
    assert cm.download_seconds(ref, 1_000_000) == pytest.approx(0.1 + 8e6 / 20e6)
    assert cm.upload_seconds(ref, 1_000_000) == pytest.approx(0.1 + 8e6 / 10e6)
    assert cm.upload_seconds(ref, 0) == 0.0
    work = {"train_examples": 10, "epochs": 2, "rank": 8, "embed_items": 50, "eval_items": 4,
            "upload_bytes": 1_000_000, "download_bytes": 1_000_000}
    assert cm.round_seconds(ref, work) == pytest.approx(1.728 + 1.0 + 1.0 + 0.5 + 0.9)
    slow, narrow = _profile(0.5, 20.0), _profile(1.0, 5.0)
    assert cm.round_seconds(slow, work) > cm.round_seconds(ref, work)
    assert cm.round_seconds(narrow, work) > cm.round_seconds(ref, work)
    assert cm.train_seconds(ref, 20, 2, 8) > cm.train_seconds(ref, 10, 2, 8)
    assert cm.train_seconds(ref, 10, 3, 8) > cm.train_seconds(ref, 10, 2, 8)
    assert cm.train_seconds(ref, 10, 2, 16) > cm.train_seconds(ref, 10, 2, 8)
    assert cm.upload_seconds(ref, 2_000_000) > cm.upload_seconds(ref, 1_000_000)
    assert cm.train_seconds(ref, 10) == pytest.approx(10 * 0.08 * 1.08)  # rank defaults to max_lora_rank
    with pytest.raises(ValueError, match="unknown work key"):
        cm.round_seconds(ref, {"train_exampels": 3})
    with pytest.raises(ValueError, match="n_examples must be a number >= 0"):
        cm.train_seconds(ref, -1)
