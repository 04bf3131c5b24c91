"""A real Flower Simulation Engine run on Ray: 20 devices, 2 rounds, results written to disk."""

from __future__ import annotations

import csv
import json

import pytest

from fedasls.config import Settings
from fedasls.device.store import DeviceStore
from simulations.report import PLOTS, write_report
from simulations.runner import HideRunSimulationDeprecation, num_slots, simulate

pytestmark = pytest.mark.integration  # a real run on Flower + Ray (module fixture)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    settings = Settings.model_validate(
        {
            "model": {"path": str(tiny_model_dir)},
            "population": {"num_devices": 20, "stream_length": 40, "heldout": 3},
            "synthesis": {"rewrites": 1, "method": "fallback"},
            "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2},
            "evaluation": {"max_new_tokens": 8},
            "heterogeneity": {"availability": "always", "dropout_scale": 0.0},
            "simulation": {
                "rounds": 2,
                "cohort_size": 16,
                "overcommit": 1.25,
                "start_time_s": 3 * 86400.0,
                "round_interval_s": 3 * 86400.0,
                "workers": 2,
                "output_dir": str(out),
            },
        }
    )
    run = simulate(settings, out / "run", quiet=True)
    summary = write_report(run.run_dir, wall_seconds=1.0)
    return run, summary


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_device_ran_both_rounds_and_state_persisted(finished_run):
    run, _ = finished_run
    rows = read_jsonl(run.run_dir / "device_rounds.jsonl")
    assert num_slots(run.settings) == 20
    by_round = {r: {row["device_id"] for row in rows if row["round"] == r} for r in (1, 2)}
    assert by_round[1] == by_round[2] == set(range(20))
    store = DeviceStore(run.store_dir)
    assert sorted(store.device_ids()) == list(range(20))
    for device_id in range(20):
        first, second = (next(r for r in rows if r["round"] == k and r["device_id"] == device_id) for k in (1, 2))
        # round 2 continued from round 1's saved state: the stream cursor only moved forward
        assert store.load(device_id)["cursor"] == first["new_interactions"] + second["new_interactions"]
        assert second["base_rouge1"] == first["base_rouge1"]


def test_uplift_metrics_and_rounds_recorded(finished_run):
    run, summary = finished_run
    rounds = read_jsonl(run.run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["completed"] == 16 and r["stragglers"] == 4 and r["dropped"] == 0 for r in rounds)
    assert rounds[1]["virtual_start_s"] > rounds[0]["virtual_start_s"]
    assert summary["devices_participated"] == 20
    mean, low, high = summary["uplift_rouge1"]
    assert low <= mean <= high
    assert sum(r["adapted"] for r in rounds) > 0


def test_results_files_and_plots_written(finished_run):
    run, _ = finished_run
    for name in ("config.toml", "rounds.csv", "device_rounds.csv", "summary.json", "checkpoint.json", *PLOTS):
        path = run.run_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
    with (run.run_dir / "device_rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {"rouge1", "base_rouge1", "tier", "role"} <= set(rows[0])
    assert json.loads((run.run_dir / "checkpoint.json").read_text())["rounds_done"] == 2


def test_resume_continues_and_one_corrupt_device_does_not_stop_the_others(finished_run, tmp_path):
    import shutil

    run, _ = finished_run
    copy = tmp_path / "resumed"
    shutil.copytree(run.run_dir, copy)
    store = DeviceStore(copy / "store")
    before = {d: store.load(d)["cursor"] for d in range(1, 20)}
    corrupt = store.folder(0) / "state.json"
    corrupt.write_text("{ not json")
    settings = run.settings.model_copy(
        update={"simulation": run.settings.simulation.model_copy(update={"rounds": 3})}
    )
    resumed = simulate(settings, copy, resume=True, quiet=True)
    rounds = read_jsonl(copy / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]  # rounds 1-2 kept, only round 3 ran
    assert rounds[2]["virtual_start_s"] == rounds[1]["virtual_start_s"] + settings.simulation.round_interval_s
    assert rounds[2]["failed"] == rounds[2]["failed_corrupt_state"] == 1  # device 0's state was corrupt ...
    row = next(r for r in read_jsonl(copy / "device_rounds.jsonl") if r["round"] == 3 and r["device_id"] == 0)
    assert row["role"] == "failed" and row["failure"] == "corrupt_state" and row["failure_code"] == 101
    aside = list(store.folder(0).parent.glob("device-0.corrupt-*"))  # ... moved aside, kept for inspection ...
    assert len(aside) == 1 and (aside[0] / "state.json").read_text() == "{ not json"
    assert store.load(0) is None  # ... and the device is reset: it starts afresh next time
    assert "CorruptStateError" in (store.folder(0) / "errors.log").read_text()  # the traceback stays on the device
    after = {d: DeviceStore(resumed.store_dir).load(d)["cursor"] for d in range(1, 20)}
    assert all(after[d] >= before[d] for d in after) and after != before  # the others went on


def test_report_command_rebuilds_tables_and_plots(finished_run, tmp_path, capsys):
    import shutil

    from simulations.cli import main

    run, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("*.csv", "*.png", "summary.json", "store"))
    assert main(["report", str(copy)]) == 0
    assert "ROUGE-1 uplift" in capsys.readouterr().out
    for name in ("rounds.csv", "device_rounds.csv", "summary.json", *PLOTS):
        assert (copy / name).is_file(), name
    assert json.loads((copy / "summary.json").read_text())["devices_participated"] == 20


def test_report_command_keeps_the_runs_recorded_wall_time(finished_run, tmp_path, capsys):
    import shutil

    from simulations.cli import main

    run, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("store"))
    assert json.loads((copy / "summary.json").read_text())["wall_seconds"] == 1.0  # what the run wrote
    assert main(["report", str(copy)]) == 0  # rewriting the report without --wall-seconds ...
    assert json.loads((copy / "summary.json").read_text())["wall_seconds"] == 1.0  # ... keeps it
    assert main(["report", str(copy), "--wall-seconds", "7.5"]) == 0
    assert json.loads((copy / "summary.json").read_text())["wall_seconds"] == 7.5


def test_flowers_run_simulation_deprecation_notice_is_hidden_and_its_errors_are_not(finished_run):
    """`simulate` installs the filter; Flower's own run_simulation still warns (so the test would
    fail if Flower changed the notice's text) and its error records still pass."""
    import logging

    from flwr.simulation import run_simulation

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    flwr_logger, handler = logging.getLogger("flwr"), Keep()
    flwr_logger.addHandler(handler)
    try:
        with pytest.raises(RuntimeError):
            run_simulation(server_app=None, client_app=None, num_supernodes=0)  # fails after its notice
        hidden = [r for r in records if "DEPRECATED" in r.getMessage()]
        errors = [r for r in records if r.levelno >= logging.ERROR]
        flwr_logger.removeFilter(next(f for f in flwr_logger.filters if isinstance(f, HideRunSimulationDeprecation)))
        records.clear()
        with pytest.raises(RuntimeError):
            run_simulation(server_app=None, client_app=None, num_supernodes=0)
        unfiltered = [r for r in records if "DEPRECATED" in r.getMessage()]
    finally:
        flwr_logger.removeHandler(handler)
    assert hidden == [] and errors  # the notice is gone, Flower's error about the bad call is not
    assert len(unfiltered) == 1  # without the filter Flower does print it: the filter is what hides it


def test_the_driver_does_not_import_the_device_pipeline():
    """The coordinator process (runner, ServerApp, fleet loop, local strategy) leaves peft and the
    training code to the workers: importing them cost its start-up about half a second."""
    import subprocess
    import sys

    code = ("import sys, simulations.runner, server.app, server.strategy; "
            "print(sorted(m for m in ('peft', 'fedasls.pipeline.training', 'fedasls.device.device') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
