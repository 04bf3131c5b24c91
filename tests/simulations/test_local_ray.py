"""The Ray a run starts for itself: a stale cluster address file cannot hang it, and Ray processes
left by a run killed with -9 are stopped by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from simulations.local_ray import OWNER_FILE, PREFIX, private_ray_dir, reap_orphans, remove


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphans_of_a_killed_run_are_stopped_and_a_live_runs_are_not():
    orphan = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
    (orphan / OWNER_FILE).write_text(str(_dead_pid()))
    live = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
    (live / OWNER_FILE).write_text(str(os.getpid()))  # a running run's folder
    sleeper = "import sys, time; time.sleep(120)"
    orphan_proc = subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={orphan}/session_x"])
    live_proc = subprocess.Popen([sys.executable, "-c", sleeper, f"--temp-dir={live}/session_y"])
    try:
        assert reap_orphans() == 1
        orphan_proc.wait(timeout=10)  # reap_orphans waited for it (so Popen sees no exit status of its own)
        assert not psutil.pid_exists(orphan_proc.pid)
        assert not orphan.exists()
        assert live_proc.poll() is None and live.is_dir()
        fresh = private_ray_dir()
        assert fresh.is_dir() and (fresh / OWNER_FILE).read_text() == str(os.getpid())
        remove(fresh)
    finally:
        for proc in (orphan_proc, live_proc):
            proc.kill()
            proc.wait()
        remove(live)


@pytest.mark.integration
def test_a_stale_cluster_address_file_does_not_hang_a_plain_simulate(tiny_model_dir, tmp_path):
    """`ray start` elsewhere on the machine (or a cluster stopped by pid) leaves <ray tmp>/ray_current_cluster;
    a plain run must still start its own Ray (it used to hang at round 1 for 10 minutes)."""
    ray_tmp = tmp_path / "ray-tmp"
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    argv = [sys.executable, "-m", "simulations.cli", "simulate", "--model", str(tiny_model_dir), "--name", "stale",
            "--set", f"simulation.output_dir='{tmp_path / 'results'}'", "--set", "simulation.rounds=1",
            "--set", "population.num_devices=6", "--set", "population.stream_length=30",
            "--set", "simulation.cohort_size=2", "--set", "simulation.workers=1",
            "--set", "evaluation.max_new_tokens=4", "--set", "synthesis.method='fallback'"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "num_cpus and num_gpus must not be provided" not in done.stderr
    assert (tmp_path / "results" / "stale" / "summary.json").is_file()
