"""`fedasls fleet` on real SuperLink / SuperNode processes: a run the ServerApp stopped exits
non-zero (flwr run itself exits 0 then), and Ctrl-C of `fleet up` stops every process it started."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedasls.config import Settings, settings_toml
from simulations.loopback import PROJECT_DIR, LoopbackFleet, stop_fleet, stop_process_tree

pytestmark = pytest.mark.integration  # real SuperLink and SuperNode processes


def _scenario(tiny_model_dir: Path, path: Path, nodes: int) -> Path:
    settings = Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": nodes, "stream_length": 30, "heldout": 2},
        "synthesis": {"rewrites": 1, "method": "fallback"},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2},
        "evaluation": {"max_new_tokens": 8},
        "heterogeneity": {"availability": "always", "dropout_scale": 0.0},
        "simulation": {"rounds": 2, "cohort_size": nodes, "overcommit": 1.0, "start_time_s": 7 * 86400.0,
                       "max_failed_share": 0.0},
        "deployment": {"min_nodes": nodes, "reply_timeout_s": 150.0, "query_timeout_s": 120.0},
    })
    path.write_text(settings_toml(settings))
    return path


def _fedasls(*argv: str, **kwargs) -> subprocess.Popen:
    # Ctrl-C reaches a command started from a terminal; a test run in the background (`pytest &` in a
    # script) would otherwise pass on an ignored SIGINT, which Python then leaves ignored
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", *argv], cwd=PROJECT_DIR, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_fleet_run_exits_non_zero_when_the_server_app_stopped_the_run(tiny_model_dir, tmp_path):
    root = tmp_path / "fleet"
    start = subprocess.run([sys.executable, "-m", "simulations.cli", "fleet", "start", "--nodes", "2", "--dir",
                            str(root)], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        store = Path(LoopbackFleet.load(root).nodes[0].store_dir)  # device 0's own state: corrupt it
        folder = store / "00" / "00" / "device-0"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text("{ truncated")
        config = _scenario(tiny_model_dir, tmp_path / "scenario.toml", nodes=2)
        run = _fedasls("fleet", "run", "--dir", str(root), "--config", str(config), "--output-dir",
                       str(tmp_path / "results"))
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 1, output[-3000:]
        assert "fedasls: error: the run stopped" in output and "max_failed_share" in output, output[-3000:]
        assert list((tmp_path / "results").glob("flwr-run-*/failure.txt"))
    finally:
        stop_fleet(root)


def test_ctrl_c_of_fleet_up_stops_every_process_it_started(tiny_model_dir, tmp_path):
    root = tmp_path / "fleet"
    config = _scenario(tiny_model_dir, tmp_path / "scenario.toml", nodes=2)
    up = _fedasls("fleet", "up", "--nodes", "2", "--dir", str(root), "--config", str(config),
                  "--output-dir", str(tmp_path / "results"))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until both SuperNodes are recorded and running
            fleet = root / "fleet.json"
            if fleet.is_file() and len(json.loads(fleet.read_text())["nodes"]) == 2 \
                    and (root / "scenario.toml").is_file():
                break
            assert up.poll() is None, up.stdout.read()[-3000:]
            time.sleep(0.2)
        started = LoopbackFleet.load(root)
        pids = [p.pid for p in (started.superlink, *started.nodes)]
        assert started.owner == up.pid and all(_alive(pid) for pid in pids)
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=120)
        assert up.returncode == 130, output[-3000:]
        assert "interrupted; stopping every process it started" in output and "Traceback" not in output
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        stop_process_tree(up.pid)
        stop_fleet(root)
