"""A real loopback fleet on Flower's Deployment Engine: a SuperLink and three SuperNodes as
processes on 127.0.0.1 (free ports), the app run node-addressed with `flwr run` for 2 rounds, one
SuperNode killed mid-run. Everything started is stopped by pid, even when the test fails."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedasls.config import Settings
from fedasls.device.store import DeviceStore
from simulations.loopback import PROJECT_DIR, LoopbackFleet, app_command, start_fleet, stop_fleet, stop_process_tree
from fedasls.config import settings_toml

pytestmark = pytest.mark.integration  # real SuperLink and SuperNode processes

NODES = 3


@pytest.fixture
def fleet(tmp_path: Path):
    root = tmp_path / "fleet"
    started = start_fleet(root, NODES)
    pids = [p.pid for p in (started.superlink, *started.nodes)]
    yield started
    stop_fleet(root)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


@pytest.fixture
def background():
    """Processes a test starts in the background; each one's tree is stopped at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        stop_process_tree(process.pid)


def scenario(tiny_model_dir: Path, path: Path, rounds: int = 2, **sections: dict) -> Path:
    settings = Settings.model_validate({**sections,
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": NODES, "stream_length": 30, "heldout": 2},
        "synthesis": {"rewrites": 1, "method": "fallback"},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2},
        "evaluation": {"max_new_tokens": 8},
        "heterogeneity": {"availability": "always", "dropout_scale": 0.0},
        "simulation": {"rounds": rounds, "cohort_size": NODES, "overcommit": 1.0, "start_time_s": 7 * 86400.0,  # every stream has begun
                       "round_interval_s": 3 * 86400.0},
        "deployment": {"min_nodes": NODES, "reply_timeout_s": 150.0, "query_timeout_s": 120.0},
    })
    path.write_text(settings_toml(settings))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def crash(pid: int) -> None:
    """SIGKILL a SuperNode and every process below it (a device that dies without a goodbye)."""
    top = psutil.Process(pid)
    for proc in [*top.children(recursive=True), top]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_node_addressed_run_with_a_supernode_killed_mid_run(fleet: LoopbackFleet, background, tiny_model_dir,
                                                            tmp_path):
    out = tmp_path / "results"
    command, env = app_command(fleet.root, scenario(tiny_model_dir, tmp_path / "scenario.toml"), out)
    log = (tmp_path / "flwr-run.log").open("w")
    run = subprocess.Popen(command, env=env, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    background.append(run)

    rounds_file = lambda: next(iter(out.glob("flwr-run-*/rounds.jsonl")), None)  # noqa: E731
    def round_one() -> bool:
        assert run.poll() is None, (tmp_path / "flwr-run.log").read_text()[-3000:]  # still running
        return bool(rounds_file() and read_jsonl(rounds_file()))

    wait_for(round_one, 300, "round 1 to be recorded")
    victim = fleet.nodes[-1]
    crash(victim.pid)
    assert run.wait(timeout=300) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]

    run_dir = rounds_file().parent
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]  # the run completed
    assert rounds[0]["completed"] == NODES and rounds[0]["failed"] == 0
    rows = read_jsonl(run_dir / "device_rounds.jsonl")
    second = {r["device_id"]: r["role"] for r in rows if r["round"] == 2}
    assert second.get(victim.device_id, "dropped") == "dropped"  # offline: not answering, or no longer connected
    assert all(second[n.device_id] == "completed" for n in fleet.nodes[:-1])
    assert rounds[1]["failed"] == 0  # offline is not a failure
    # each device's state lives in its own node's folder only, none in the server's run folder
    for node in fleet.nodes:
        assert list(DeviceStore(node.store_dir).device_ids()) == [node.device_id]
    assert list(DeviceStore(run_dir / "store").device_ids()) == []
    survivor = fleet.nodes[0].device_id
    ran = [r["new_interactions"] for r in rows if r["device_id"] == survivor]
    assert len(ran) == 2 and sum(ran) > 0  # round 2 continued from round 1's saved state:
    assert DeviceStore(fleet.nodes[0].store_dir).load(survivor)["cursor"] == sum(ran)


def test_secagg_plus_global_adapter_round_on_the_deployment_engine(fleet: LoopbackFleet, tiny_model_dir, tmp_path):
    """SecAgg+ with one device per SuperNode: every node takes part in the protocol, the server
    unmasks the weighted mean of their updates and applies it to the global adapter."""
    out = tmp_path / "results"
    federated = {"strategy": "global", "secure_aggregation": "secagg+", "clip_norm": 0.05}
    path = scenario(tiny_model_dir, tmp_path / "scenario.toml", rounds=1, federated=federated)
    command, env = app_command(fleet.root, path, out)
    done = subprocess.run(command, env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run_dir = next(out.glob("flwr-run-*"))
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1]
    assert all(r["secagg_ok"] and r["completed"] == NODES and r["failed"] == 0 for r in rounds)
    assert all(r["contributors"] >= 1 and r["global_step_norm"] > 0 for r in rounds)
    assert sorted((run_dir / "global-adapter").glob("round-*.safetensors"))


def test_flwr_leaves_its_managed_superlink_running_and_fleet_stop_local_stops_it(tmp_path):
    """`flwr` starts a managed local SuperLink for the `local` connection (as `flwr run .` does) and
    leaves it (and its SuperExec) running; `stop_local_superlink` stops that tree. Own ports and
    FLWR_HOME, so no other Flower on this machine is touched."""
    from simulations.loopback import flower_env, free_port, stop_local_superlink

    port = free_port()
    env = flower_env(tmp_path / "flwr-home") | {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
                                                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    try:
        for _ in range(3):  # Flower gives its managed SuperLink 15 s to start: on a loaded machine, try again
            done = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls"], env=env, capture_output=True,
                                  text=True, timeout=120)
            if "Failed to start local SuperLink" not in done.stdout + done.stderr:
                break
        listening = [c.pid for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid]
        assert listening, done.stdout + done.stderr  # flwr returned, its SuperLink still runs
        superlink = psutil.Process(listening[0])
        wait_for(lambda: superlink.children(recursive=True), 90, "the SuperLink to start its SuperExec")
        tree = [superlink.pid, *(p.pid for p in superlink.children(recursive=True))]
        assert stop_local_superlink(port) >= len(tree) >= 2  # the SuperLink and its SuperExec
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in tree)
    finally:
        stop_local_superlink(port)  # whatever happened above, leave nothing running
    assert stop_local_superlink(port) == 0
