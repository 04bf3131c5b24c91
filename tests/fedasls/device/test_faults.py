"""Failure handling without Ray: store generations and rollback, the checkpoint as commit point,
resume settings, results folders."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from fedasls.config import ConfigError, Settings, load_settings
from fedasls.device.faults import DeviceFailure, FailureCode, contained
from fedasls.device.store import CorruptStateError, DeviceStore
from server.checkpoint import CheckpointError, commit_round, failure_budget_exceeded, read_checkpoint, truncate_records
from fedasls.config import settings_toml
from simulations.validation import resume_settings


def test_a_rerun_round_starts_from_the_state_before_it(tmp_path: Path):
    DeviceStore(tmp_path, round=1).save(4, {"cursor": 10})
    DeviceStore(tmp_path, round=2).save(4, {"cursor": 25})  # round 2 saved, then the run was killed
    rerun = DeviceStore(tmp_path, round=2)
    assert rerun.load(4) == {"cursor": 10}  # the attempt of round 2 is rolled back
    rerun.save(4, {"cursor": 26})
    assert DeviceStore(tmp_path, round=3).load(4) == {"cursor": 26}  # round 2 recorded: round 3 continues it
    DeviceStore(tmp_path, round=1).save(9, {"cursor": 3})  # a device first saved by an unrecorded round 1 ...
    assert DeviceStore(tmp_path, round=1).load(9) is None  # ... is new again when round 1 reruns
    files = sorted(p.name for p in DeviceStore(tmp_path).folder(4).iterdir())
    assert files == ["state.json", "state.prev.json"]  # two generations, nothing else left behind
    assert DeviceStore(tmp_path).load(4) == {"cursor": 26}  # a store without a round reads the newest


def test_contained_keeps_where_it_failed_on_the_device_and_sets_corrupt_state_aside(tmp_path: Path):
    store = DeviceStore(tmp_path, round=3)
    with pytest.raises(DeviceFailure) as failed:
        with contained(5, store):
            raise ValueError("field 'note': My bank PIN is 4321")
    assert failed.value.code == FailureCode.ERROR and "4321" not in str(failed.value)
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
    log = (store.folder(5) / "errors.log").read_text()
    assert "builtins.ValueError (message withheld" in log and "test_faults.py" in log  # type and place ...
    assert "4321" not in log and "bank PIN" not in log  # ... never the data its message quoted

    store.save(6, {"cursor": 1})
    (store.folder(6) / "state.json").write_text("{ truncated")
    with pytest.raises(DeviceFailure) as failed:
        with contained(6, store):
            store.load(6)
    assert failed.value.code == FailureCode.CORRUPT_STATE
    aside = list(store.folder(6).parent.glob("device-6.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "state.json").read_text() == "{ truncated"
    assert store.load(6) is None and list(store.device_ids()) == []  # reset: it starts afresh
    assert "CorruptStateError" in (store.folder(6) / "errors.log").read_text()


def _row(r: int) -> dict:
    return {"round": r, "x": r}


def test_records_are_cut_back_to_the_checkpoint(tmp_path: Path):
    (tmp_path / "rounds.jsonl").write_text("")
    (tmp_path / "device_rounds.jsonl").write_text("")
    lock = threading.Lock()
    for r in (1, 2):
        commit_round(tmp_path, [_row(r), _row(r)], _row(r), {"rounds_done": r, "coordinator": {}, "wall_seconds": 1.0,
                                                             "device_rounds": 2 * r, "failed": 0}, lock)
    with (tmp_path / "device_rounds.jsonl").open("a") as f:  # killed while recording round 3
        f.write(json.dumps(_row(3)) + "\n" + '{"round": 3, "x"')
    truncate_records(tmp_path, read_checkpoint(tmp_path)["rounds_done"])
    rows = [json.loads(line) for line in (tmp_path / "device_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 1, 2, 2]
    (tmp_path / "rounds.jsonl").write_text(json.dumps(_row(1)) + "\n")  # a recorded round went missing
    with pytest.raises(CheckpointError, match="rounds 1..2 are done"):
        truncate_records(tmp_path, 2)


def test_a_truncated_checkpoint_is_named_with_its_fix(tmp_path: Path):
    (tmp_path / "checkpoint.json").write_text('{"rounds_done": 2, "coordi')
    with pytest.raises(CheckpointError, match=r"checkpoint.json is truncated or corrupt .*Fix: .*--overwrite"):
        read_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{"rounds_done": "two"}')
    with pytest.raises(CheckpointError, match="'rounds_done' missing or invalid"):
        read_checkpoint(tmp_path)


def test_failure_budget():
    assert failure_budget_exceeded(4, 4, 1.0)  # every device failed: always stop
    assert failure_budget_exceeded(10, 6, 0.5) and not failure_budget_exceeded(10, 5, 0.5)
    assert not failure_budget_exceeded(0, 0, 0.0)
    assert failure_budget_exceeded(12, 6, 0.5, round_ran=6, round_failed=6)  # a whole round failed
    assert not failure_budget_exceeded(12, 6, 0.5, round_ran=6, round_failed=5)


def test_resume_takes_the_runs_settings_and_refuses_others(tmp_path: Path):
    recorded = Settings.model_validate({"population": {"num_devices": 7, "stream_length": 40},
                                        "simulation": {"rounds": 2, "cohort_size": 3}})
    (tmp_path / "config.toml").write_text(settings_toml(recorded))
    assert load_settings(tmp_path / "config.toml") == recorded  # config.toml round-trips exactly
    assert resume_settings(tmp_path, None, []) == recorded
    assert resume_settings(tmp_path, None, ["simulation.rounds=5"]).simulation.rounds == 5
    with pytest.raises(ConfigError, match=r"population.stream_length: run has 40, given 120.*Fix: drop"):
        resume_settings(tmp_path, None, ["population.stream_length=120"])
    with pytest.raises(ConfigError, match="below the run's 2"):
        resume_settings(tmp_path, None, ["simulation.rounds=1"])


def test_corrupt_state_error_names_the_device_and_fix(tmp_path: Path):
    store = DeviceStore(tmp_path)
    store.save(2, {"cursor": 1})
    (store.folder(2) / "state.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptStateError, match=r"device 2: .*state.json is corrupt.*Fix: move the folder"):
        store.load(2)
