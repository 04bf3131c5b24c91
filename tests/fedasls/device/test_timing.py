"""The stage timer: exclusive nested stages, merging, no cost when nobody records, round figures."""

from __future__ import annotations

import time

import pytest

from fedasls.config import Settings
from fedasls.device.round import run_device_round
from fedasls.sim.heterogeneity import HeterogeneityModel
from fedasls.device.worker import DeviceRuntime
from fedasls.device.store import DeviceStore
from fedasls.device.timing import STAGES, StageTimer, current, record, stage


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_nested_stage_time_counts_for_the_inner_stage_only():
    timer = StageTimer()
    with timer.stage("outer"):
        _busy(0.02)
        with timer.stage("inner"):
            _busy(0.05)
    t = timer.seconds()
    assert t["inner"].cpu >= 0.05 and t["inner"].calls == 1
    assert 0.02 <= t["outer"].cpu < 0.05  # the inner 0.05 s is not counted twice
    assert t["outer"].wall >= t["outer"].cpu * 0.5


def test_a_paused_block_counts_for_no_stage_and_a_credit_adds_to_one():
    """A device thread waiting on its worker's batcher: the wait is no stage's time; its share of the batch is."""
    timer = StageTimer()
    with timer.stage("gate"):
        assert timer.innermost() == "gate"
        _busy(0.02)
        with timer.paused():
            _busy(0.05)
        timer.credit("gate", 0.01, 0.01)
    t = timer.seconds()["gate"]
    assert 0.03 <= t.cpu < 0.06 and t.calls == 1  # 0.02 own + 0.01 credited; not the paused 0.05
    assert timer.innermost() is None


def test_stage_without_recording_is_a_no_op_and_record_merges_into_the_enclosing_one():
    with stage("nobody"):
        assert current() is None
    with record() as outer:
        with stage("messaging"):
            with record() as inner:
                with stage("train"):
                    _busy(0.03)
        with stage("train"):
            pass
    assert set(inner.seconds()) == {"train"}
    assert outer.seconds()["train"].calls == 2
    assert outer.seconds()["train"].cpu >= 0.03
    assert outer.seconds()["messaging"].cpu < 0.03  # the nested recording is excluded from it
    assert list(outer.seconds()) == ["train", "messaging"]  # pipeline order
    assert current() is None


def test_device_round_reports_its_stage_seconds_as_numbers(tiny_model_dir, tmp_path):
    settings = Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": 4, "stream_length": 30, "heldout": 2},
        "synthesis": {"method": "fallback", "rewrites": 1},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2},
        "evaluation": {"max_new_tokens": 6},
        "heterogeneity": {"availability": "always"},
    })
    runtime = DeviceRuntime(settings)
    with record() as outer:
        result = run_device_round(1, 30 * 86400.0, runtime, settings, DeviceStore(tmp_path),
                                  HeterogeneityModel.from_settings(settings.heterogeneity))
    assert result.adapted == 1
    metrics = result.metrics()
    for name in ("load_state", "catch_up", "embed", "select", "feedback", "synthesize", "train", "evaluate", "save"):
        assert name in STAGES
        assert metrics[f"stage_{name}_s"] >= 0 and metrics[f"stage_{name}_cpu_s"] >= 0
    assert metrics["stage_train_cpu_s"] > 0 and metrics["stage_evaluate_cpu_s"] > 0
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["stage_messaging_s"] == 0.0  # every stage is reported, so every device has the same keys
    total = sum(t.cpu for t in outer.seconds().values())
    assert total == pytest.approx(sum(v for k, v in metrics.items() if k.endswith("_cpu_s")))
