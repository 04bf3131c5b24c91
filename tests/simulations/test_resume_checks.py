"""What `--resume` checks on the driver before Ray starts: the checkpoint's fields, the coordinator
state, the device store, the dataset, and whether anything is left to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedasls.config import ConfigError, Settings
from fedasls.device.store import DeviceStore
from fedasls.sim.heterogeneity import HeterogeneityModel
from server.checkpoint import CHECKPOINT, CheckpointError, mark_run_dir, write_checkpoint
from server.rounds import new_coordinator
from simulations.cli import main
from fedasls.config import settings_toml
from simulations.validation import check_resumable, record_inputs


def _run(tmp_path: Path, settings: Settings, rounds_done: int, device_rounds: int) -> Path:
    """A run folder as `fedasls simulate` leaves it after `rounds_done` rounds (records not needed here)."""
    run = tmp_path / "results" / "run"
    mark_run_dir(run)
    (run / "config.toml").write_text(settings_toml(settings))
    record_inputs(settings, run)
    coordinator = new_coordinator(settings, HeterogeneityModel.from_settings(settings.heterogeneity), True)
    write_checkpoint(run, {"rounds_done": rounds_done, "coordinator": coordinator.state(), "wall_seconds": 1.5,
                           "device_rounds": device_rounds, "failed": 0})
    if device_rounds:
        DeviceStore(run / "store").save(0, {"cursor": 1})
    return run


def _dataset(path: Path, users: int = 4) -> Path:
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "user_id": f"u{i % users}"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_fresh_checkpoint_at_round_0_is_resumable(tmp_path):
    run = _run(tmp_path, Settings(), rounds_done=0, device_rounds=0)
    assert check_resumable(run, Settings()) == 0


@pytest.mark.parametrize("key", ["rounds_done", "device_rounds", "failed"])
def test_a_negative_count_in_the_checkpoint_is_refused(tmp_path, key):
    run = _run(tmp_path, Settings(), rounds_done=1, device_rounds=3)
    data = json.loads((run / CHECKPOINT).read_text())
    data[key] = -1
    (run / CHECKPOINT).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"'{key}' is negative"):
        check_resumable(run, Settings())


def test_garbage_coordinator_state_is_a_clear_error(tmp_path):
    run = _run(tmp_path, Settings(), rounds_done=1, device_rounds=3)
    data = json.loads((run / CHECKPOINT).read_text())
    data["coordinator"] = {"population_size": "many"}
    (run / CHECKPOINT).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="coordinator state is damaged"):
        check_resumable(run, Settings())


def test_a_deleted_device_store_is_refused(tmp_path):
    import shutil

    run = _run(tmp_path, Settings(), rounds_done=1, device_rounds=3)
    shutil.rmtree(run / "store")
    with pytest.raises(CheckpointError, match="device store of this run is missing"):
        check_resumable(run, Settings())


def test_a_dataset_changed_since_the_run_began_is_refused(tmp_path):
    data = _dataset(tmp_path / "users.jsonl")
    settings = Settings.model_validate({"population": {"source": "jsonl", "jsonl_path": str(data),
                                                       "num_devices": 4}})
    run = _run(tmp_path, settings, rounds_done=1, device_rounds=3)
    assert check_resumable(run, settings) == 1
    with data.open("a") as fh:
        fh.write(json.dumps({"instruction": "new", "output": "x", "user_id": "u1"}) + "\n")
    with pytest.raises(ConfigError, match="changed since the run began"):
        check_resumable(run, settings)


def test_resuming_a_finished_run_says_so_and_starts_nothing(tmp_path, capsys):
    settings = Settings.model_validate({"simulation": {"rounds": 2}})
    run = _run(tmp_path, settings, rounds_done=2, device_rounds=6)
    before = (run / CHECKPOINT).read_bytes()
    assert main(["simulate", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "already finished its 2 rounds" in out and "simulation.rounds=3" in out
    assert (run / CHECKPOINT).read_bytes() == before and not (run / "summary.json").exists()
