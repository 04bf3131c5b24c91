"""A device end to end on the tiny real model: observe, adapt, evaluate, persist."""

from __future__ import annotations

import math

import pytest
import torch

from fedasls.config import Settings
from fedasls.device.device import Device
from fedasls.device.round import load_device, run_device_round
from fedasls.sim.simulated_timing import SimulatedTiming
from fedasls.sim.heterogeneity import HeterogeneityModel
from fedasls.interaction import STREAM_EPOCH
from fedasls.device.worker import DeviceRuntime
from fedasls.device.store import DeviceStore

from tests.settings_update import updated


@pytest.fixture(scope="module")
def settings(make_settings) -> Settings:
    return make_settings(
        population={"num_devices": 20, "stream_length": 60, "heldout": 4},
        selection={"buffer_bytes": 8192},
        feedback={"annotation_budget": 6},
        synthesis={"rewrites": 2, "method": "fallback"},
        adaptation={"epochs": 2, "lora_rank": 4, "min_new_items": 3, "min_items": 4, "gate": "off"},
        evaluation={"max_new_tokens": 12},
    )


def test_observe_keeps_buffer_within_budget_and_updates_profile(runtime, settings):
    device = Device(1, runtime, settings)
    assert device.catch_up() == 60
    buf = device.selector.buffer
    assert 0 < buf.used_bytes <= buf.budget_bytes
    assert device.profile.n_observed == 60
    assert device.cursor == 60 and device.catch_up() == 0


def test_a_fleet_device_scales_the_configured_buffer_by_its_storage(runtime, settings, tmp_path):
    """selection.buffer_bytes is a mid-tier device's budget in a fleet: a setting the fleet used to ignore."""
    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
    store = DeviceStore(tmp_path)
    tiers = {}
    for device_id in range(20):
        tiers.setdefault(hetero.profile(device_id).tier, device_id)
    assert {"low", "high"} <= set(tiers)
    for budget in (8192, 65536):
        s = updated(settings, selection={"buffer_bytes": budget})
        for tier, device_id in tiers.items():
            storage = hetero.profile(device_id).storage_mb
            got = load_device(device_id, runtime, s, store, hetero).selector.buffer.budget_bytes
            assert abs(got - budget * storage / 32) <= 256, (tier, budget, got)


def test_catch_up_respects_virtual_time(runtime, settings):
    device = Device(2, runtime, settings)
    stream = runtime.population.stream(2)
    middle = stream[30].timestamp
    n = device.catch_up(until=middle)
    assert n == sum(it.timestamp <= middle for it in stream)
    assert device.catch_up(until=middle) == 0


def test_adapt_annotates_only_buffered_items_within_budget_and_learns(runtime, settings):
    device = Device(3, runtime, settings)
    device.catch_up()
    assert device.should_adapt()
    buffered = {it.index for it in device.selector.interactions()}
    report = device.adapt()
    assert set(device.annotations) <= buffered
    assert device.user.annotations_used <= settings.feedback.annotation_budget
    assert report.annotated == len(device.annotations) > 0
    assert report.examples >= report.annotated - report.heldback + report.synthesized
    assert report.heldback >= 1 and report.status == "accepted"  # gate "off" in these settings
    assert report.loss_last < report.loss_first
    assert device.adapter is not None
    assert not device.should_adapt()  # nothing new since the adaptation


def test_personal_adapter_improves_fit_to_own_data(runtime, settings):
    device = Device(4, runtime, settings)
    device.catch_up()
    device.adapt()
    personal, base = device.evaluate()
    assert math.isfinite(personal.perplexity) and math.isfinite(base.perplexity)
    assert personal.perplexity != base.perplexity
    # evaluating leaves the shared model's base behaviour untouched
    again_personal, again_base = Device(5, runtime, settings).evaluate()
    assert again_personal == again_base


def test_state_round_trip_restores_everything(runtime, settings):
    device = Device(6, runtime, settings)
    device.catch_up(until=runtime.population.stream(6)[40].timestamp)
    device.adapt()
    device.evaluate()
    clone = Device.from_state(device.to_state(), runtime, settings)
    assert clone.cursor == device.cursor
    assert clone.annotations == device.annotations
    assert [it.index for it in clone.selector.interactions()] == [it.index for it in device.selector.interactions()]
    assert clone.profile.to_state() == device.profile.to_state()
    assert all(torch.equal(clone.adapter[k], device.adapter[k]) for k in device.adapter)
    assert clone.evaluate()[0] == device.last_eval
    # both continue identically
    assert clone.catch_up() == device.catch_up()
    assert clone.selector.to_state()["seq"] == device.selector.to_state()["seq"]


def test_state_version_mismatch_is_a_clear_error(runtime, settings):
    state = Device(7, runtime, settings).to_state()
    state["version"] = 999
    with pytest.raises(ValueError, match="delete the device's folder"):
        Device.from_state(state, runtime, settings)


def test_without_profile_trigger_the_device_always_adapts(runtime, settings):
    device = Device(8, runtime, updated(settings, adaptation={"use_profile_trigger": False}))
    device.catch_up()
    device.adapt()
    assert device.should_adapt()


def test_ignoring_feedback_uses_annotations_only(runtime, settings):
    with_feedback = Device(10, runtime, settings)
    without = Device(10, runtime, updated(settings, feedback={"use_implicit": False}))
    for device in (with_feedback, without):
        device.catch_up()
    r_with, r_without = with_feedback.adapt(), without.adapt()
    assert r_without.edits == r_without.accepts == 0
    assert r_without.examples == r_without.annotated - r_without.heldback + r_without.synthesized
    # the user reacted to every unannotated buffered answer only when feedback is on
    assert sum(with_feedback.profile.feedback.values()) == r_with.buffered > 0
    assert sum(without.profile.feedback.values()) == 0


def test_device_round_persists_state_between_rounds(runtime, settings, tmp_path):
    store = DeviceStore(tmp_path / "store")
    hetero = HeterogeneityModel(seed=0, availability="always")
    first_ts = min(it.timestamp for it in runtime.population.stream(9))
    t1 = first_ts - STREAM_EPOCH + 6 * 3600
    r1 = run_device_round(9, t1, runtime, settings, store, hetero)
    assert r1.status == "completed" and store.exists(9)
    saved = store.load(9)
    assert saved["cursor"] == r1.new_interactions > 0
    r2 = run_device_round(9, t1 + 10 * 86400, runtime, settings, store, hetero)
    assert store.load(9)["cursor"] == r1.new_interactions + r2.new_interactions == 60
    assert r2.wall_seconds > 0 and r2.work.embed_items == r2.new_interactions and r2.base_rouge1 == r1.base_rouge1


def test_device_going_offline_loses_the_rounds_work(runtime, settings, tmp_path):
    store = DeviceStore(tmp_path / "store")
    hetero = HeterogeneityModel(seed=0, availability="diurnal")
    # find a device and a time at which it is online but goes offline within a second
    found = [
        (device_id, end - 0.5)
        for device_id in range(runtime.population.num_devices)
        for _, end in hetero.profile(device_id).availability.windows
        if not hetero.profile(device_id).availability.is_available(end)
    ]
    device_id, now = found[0]
    assert hetero.profile(device_id).availability.is_available(now)
    timing, later = SimulatedTiming(hetero), now + 20 * 86400  # windows repeat daily
    result = run_device_round(device_id, later, runtime, settings, store, hetero,
                              keep=timing.keep_if_online(device_id, later))
    assert result.status == "offline" and timing.seconds(device_id, result.work.cost_work()) > 0.5
    assert not store.exists(device_id)
    assert run_device_round(device_id, later, runtime, settings, store, hetero).status == "completed"  # a real device keeps it
    assert store.exists(device_id)


def test_dp_device_reports_its_cumulative_epsilon(runtime, settings):
    from fedasls.privacy.accounting import composed_epsilon

    dp_settings = updated(settings, adaptation={"dp": True, "noise_multiplier": 1.0, "epochs": 1,
                                                "use_profile_trigger": False})
    device = Device(11, runtime, dp_settings)
    stream = runtime.population.stream(11)
    device.catch_up(until=stream[30].timestamp)
    first = device.adapt().epsilon
    device.catch_up()
    second = device.adapt().epsilon
    assert 0 < first < second
    assert second == pytest.approx(composed_epsilon(device.dp_history, dp_settings.adaptation.delta))
    assert len(device.dp_history) == 2
    assert Device.from_state(device.to_state(), runtime, dp_settings).dp_history == device.dp_history


def test_trigger_waits_until_half_the_buffer_is_new(runtime, settings):
    import math

    no_drift = settings.adaptation.model_copy(update={"drift_trigger": 2.0})  # drift can never fire
    device = Device(12, runtime, settings.model_copy(update={"adaptation": no_drift}))
    stream = runtime.population.stream(12)
    device.observe(stream[:30])
    device.adapt()
    decisions = []
    for it in stream[30:]:
        device.observe([it])
        enough = max(no_drift.min_new_items, math.ceil(no_drift.min_new_fraction * len(device.selector.buffer)))
        decisions.append(device.should_adapt())
        assert decisions[-1] == (device.selector.changes_since_adaptation >= enough)
    assert not decisions[0] and any(decisions)  # it waits, then fires


def test_devices_with_different_settings_share_one_runtime(runtime, settings):
    other = updated(settings, selection={"policy": "fifo"})
    full, fifo = Device(13, runtime, settings), Device(13, runtime, other)
    for device in (full, fifo):
        device.catch_up()
    assert full.settings.selection.policy == "full" and fifo.settings.selection.policy == "fifo"
    assert [it.index for it in full.selector.interactions()] != [it.index for it in fifo.selector.interactions()]
    # a device whose settings need another model or population is refused, not silently run
    bigger = updated(settings, population={"num_devices": 21})
    with pytest.raises(ValueError, match="build a DeviceRuntime"):
        Device(13, runtime, bigger)


def test_advance_checks_the_trigger_every_chunk(runtime, settings):
    from fedasls.device.stream import advance

    chunked, at_once = Device(14, runtime, settings), Device(14, runtime, settings)
    seen: list[int] = []
    progress = advance(chunked, check_every=10, on_chunk=lambda n, report: seen.append(n))
    assert seen == [10] * 6 and progress.new_interactions == chunked.cursor == 60
    assert len(progress.adaptations) == chunked.counters.adaptations >= 1
    once = advance(at_once)
    assert once.new_interactions == 60 and len(once.adaptations) == at_once.counters.adaptations <= 1
    assert advance(chunked).new_interactions == 0  # nothing pending: one check, nothing new


def test_synthesis_auto_is_decided_once_per_model_and_reported(tiny_model_dir):
    settings = Settings.model_validate(
        {
            "model": {"path": str(tiny_model_dir)},
            "population": {"num_devices": 6, "stream_length": 30, "heldout": 2},
            "feedback": {"annotation_budget": 3},
            "synthesis": {"rewrites": 2, "method": "auto"},
            "adaptation": {"epochs": 1, "lora_rank": 4, "min_items": 2},  # 3 annotations suffice here
            "evaluation": {"max_new_tokens": 6},
        }
    )
    runtime = DeviceRuntime(settings)
    assert not runtime._paraphrase_probes  # measured lazily, on the first adaptation
    reports = []
    for device_id in (1, 2):
        device = Device(device_id, runtime, settings)
        device.catch_up()
        reports.append(device.adapt())
        assert len(runtime._paraphrase_probes) == 1
        probe = runtime.paraphrase_probe(settings.synthesis)
    assert runtime.paraphrase_probe(settings.synthesis) is probe  # the second device reused the measurement
    expected = "llm" if probe.can_paraphrase else "fallback"
    assert [r.synthesis_method for r in reports] == [expected, expected]
    assert probe.generated == 3 * 4  # 3 rewrites of each of the 4 probe questions
