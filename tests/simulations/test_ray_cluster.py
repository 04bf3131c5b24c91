"""Attaching a simulation to an existing Ray cluster, and the worker plan around Flower's
driver-side cap of min(32, cpu_count + 4) concurrent ClientApp calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedasls.config import Settings
from fedasls.device.store import DeviceStore
from simulations.loopback import free_port, stop_process_tree
from simulations.runner import backend_config, num_slots, plan_workers, simulate

pytestmark = pytest.mark.integration  # a real Ray cluster on loopback


def test_plan_fills_a_large_cluster_despite_flowers_thread_cap():
    settings = Settings.model_validate({"simulation": {"workers": 2, "cpus_per_worker": 1.0}})
    big = plan_workers(settings, cluster_cpus=256, flower_calls=32)
    assert (big.workers, big.devices_per_worker, big.concurrent_devices) == (32, 8, 256)
    assert backend_config(settings, big, attached=True) == {
        "client_resources": {"num_cpus": 8.0, "num_gpus": 0.0},  # each worker slot holds its devices' CPUs
        "init_args": {"logging_level": 40, "log_to_driver": False},  # no num_cpus for an attached cluster
    }
    assert plan_workers(settings, cluster_cpus=3, flower_calls=32).concurrent_devices == 3
    local = plan_workers(settings, None, flower_calls=6)
    assert (local.workers, local.devices_per_worker) == (2, 1)
    assert backend_config(settings, local)["init_args"]["num_cpus"] == 2
    many = Settings.model_validate({"simulation": {"workers": 50}})
    assert plan_workers(many, None, flower_calls=6).workers == 6  # more would never run at once
    assert num_slots(Settings.model_validate({"simulation": {"cohort_size": 10, "overcommit": 1.0}}), 4) == 3


@pytest.fixture
def ray_head():
    """A Ray head on loopback with 4 CPUs, stopped by its pid (never `ray stop`: it stops every Ray)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayfl", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # this machine's memory is shared with other jobs: keep Ray's OOM killer off our few small workers
        env=os.environ | {"RAY_memory_monitor_refresh_ms": "0"},
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while subprocess.run([ray, "status", f"--address={address}"], capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up within 90 s"
            time.sleep(1)
        yield address, head
    finally:
        stop_process_tree(head.pid)


def test_simulation_attaches_to_a_running_ray_cluster(ray_head, tiny_model_dir, tmp_path):
    address, head = ray_head
    settings = Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": 8, "stream_length": 30, "heldout": 2},
        "synthesis": {"rewrites": 1, "method": "fallback"},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2},
        "evaluation": {"max_new_tokens": 8},
        "heterogeneity": {"availability": "always", "dropout_scale": 0.0},
        "simulation": {"rounds": 2, "cohort_size": 6, "overcommit": 1.0, "start_time_s": 3 * 86400.0,
                       "round_interval_s": 3 * 86400.0, "workers": 1, "devices_per_worker": 2,
                       "ray_address": address, "output_dir": str(tmp_path)},
    })
    run = simulate(settings, tmp_path / "run", quiet=True)
    # the plan followed the cluster's 4 CPUs (not the local `workers = 1`): 2 slots x 2 devices side by side
    assert (run.summary["ray"], run.summary["workers"], run.summary["devices_per_worker"]) == (address, 2, 2)
    rounds = [json.loads(line) for line in (run.run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["completed"], r["failed"]) for r in rounds] == [(1, 6, 0), (2, 6, 0)]
    rows = [json.loads(line) for line in (run.run_dir / "device_rounds.jsonl").read_text().splitlines()]
    assert all(r["device_seconds"] > 0 for r in rows)  # simulated seconds from the reported work
    store = DeviceStore(run.store_dir)
    for device_id in {r["device_id"] for r in rows}:
        ran = [r for r in rows if r["device_id"] == device_id]
        assert store.load(device_id)["cursor"] == sum(r["new_interactions"] for r in ran)
    assert head.poll() is None and psutil.Process(head.pid).is_running()  # the cluster is still up after the run
