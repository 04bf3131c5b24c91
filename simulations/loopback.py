"""A loopback prototype fleet on Flower's Deployment Engine: real processes on 127.0.0.1 only.

`start_fleet` starts one SuperLink and N SuperNodes (SuperNode i is device i, with its own state
folder), each on a free port picked at run time, offline (no runtime dependency installation, no
telemetry), and writes the connection to `<dir>/flwr-home/config.toml` (Flower's FLWR_HOME), never
to pyproject. `run_app` runs this project's Flower app against it node-addressed, `fleet_status`
shows what runs, and `stop_fleet` stops every process it started (each one's whole process tree,
by pid). What was started is recorded in `<dir>/fleet.json`.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

FLEET_FILE = "fleet.json"
CONNECTION = "fedasls-fleet"  # the [superlink.<name>] connection in $FLWR_HOME/config.toml
PROJECT_DIR = Path(__file__).resolve().parent.parent  # holds pyproject.toml with [tool.flwr.app]


class FleetError(RuntimeError):
    """The loopback fleet cannot start, run or be found; the message says what to do."""


@dataclass
class FleetProcess:
    """One process the fleet started."""

    role: str  # "superlink" | "supernode"
    pid: int
    port: int
    log: str
    device_id: int | None = None
    store_dir: str | None = None

    def alive(self) -> bool:
        return _pid_alive(self.pid)


@dataclass
class LoopbackFleet:
    """A SuperLink and its SuperNodes, as recorded in `<root>/fleet.json`."""

    root: Path
    superlink: FleetProcess
    nodes: list[FleetProcess] = field(default_factory=list)
    owner: int | None = None  # the pid of the `fedasls fleet up` that started it and will stop it (None: the user)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink.port}"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    def save(self) -> None:
        data = {"superlink": asdict(self.superlink), "nodes": [asdict(n) for n in self.nodes], "owner": self.owner}
        (self.root / FLEET_FILE).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, root: Path) -> "LoopbackFleet":
        path = root / FLEET_FILE
        if not path.is_file():
            raise FleetError(f"no fleet recorded in {root} ({FLEET_FILE} missing): start one with "
                             f"`fedasls fleet start --dir {root}`")
        data = json.loads(path.read_text())
        return cls(root, FleetProcess(**data["superlink"]), [FleetProcess(**n) for n in data["nodes"]],
                   data.get("owner"))


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This environment, offline, with Flower's home (connections, apps) in `flwr_home`."""
    env = dict(os.environ)
    # Flower's processes start each other by name (flower-superlink -> flower-superexec): find them in
    # this Python's environment even when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0"})
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A Flower executable next to this Python (the project's environment), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> int:
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    return process.pid


def _wait_listening(proc: FleetProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise FleetError(f"the {proc.role} (pid {proc.pid}) exited at start; see its log {proc.log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", proc.port)) == 0:
                return
        time.sleep(0.2)
    raise FleetError(f"the {proc.role} (pid {proc.pid}) did not listen on 127.0.0.1:{proc.port} within "
                     f"{timeout_s:.0f} s; see its log {proc.log}")


def write_connection(flwr_home: Path, address: str) -> Path:
    """`$FLWR_HOME/config.toml` with the loopback SuperLink as the default connection."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "{address}"\ninsecure = true\n')
    return path


def start_fleet(root: Path, num_nodes: int, first_device: int = 0, timeout_s: float = 60.0,
                owner: int | None = None) -> LoopbackFleet:
    """Start a SuperLink and `num_nodes` SuperNodes (devices first_device ...) on loopback; `owner`: the
    pid of the process that will stop them (`fleet up`), so a later fleet call can tell they were abandoned."""
    if num_nodes < 1:
        raise FleetError(f"--nodes {num_nodes}: a fleet needs at least one SuperNode")
    root = root.resolve()
    stop_orphaned_fleet(root)
    if (root / FLEET_FILE).is_file() and any(p.alive() for p in _processes(LoopbackFleet.load(root))):
        raise FleetError(f"a fleet is already running in {root}: `fedasls fleet stop --dir {root}` first")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    env = flower_env(root / "flwr-home")
    port = free_port()
    log = root / "logs" / "superlink.log"
    pid = _spawn([_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                  "--database", str(root / "superlink.db")], log, env)
    fleet = LoopbackFleet(root, FleetProcess("superlink", pid, port, str(log)), owner=owner)
    fleet.save()
    try:
        _wait_listening(fleet.superlink, timeout_s)
        write_connection(fleet.flwr_home, fleet.address)
        for device_id in range(first_device, first_device + num_nodes):
            store = root / "devices" / f"device-{device_id}"
            store.mkdir(parents=True, exist_ok=True)
            node_port = free_port()
            node_log = root / "logs" / f"supernode-{device_id}.log"
            node_config = f"partition-id={device_id} store-dir={json.dumps(str(store))}"
            node_pid = _spawn([_bin("flower-supernode"), "--insecure", "--superlink", fleet.address,
                               "--port", str(node_port), "--node-config", node_config], node_log, env)
            fleet.nodes.append(FleetProcess("supernode", node_pid, node_port, str(node_log), device_id, str(store)))
            fleet.save()
        for node in fleet.nodes:
            _wait_listening(node, timeout_s)
    except BaseException:
        stop_fleet(root)
        raise
    return fleet


def _processes(fleet: LoopbackFleet) -> list[FleetProcess]:
    return [*fleet.nodes, fleet.superlink]


def stop_process_tree(pid: int, timeout_s: float = 10.0) -> int:
    """Stop process `pid` and every process below it (SuperExec, app processes): SIGTERM, then
    SIGKILL after `timeout_s`. Returns how many were stopped."""
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return len(procs)


def stop_orphaned_fleet(root: Path) -> int:
    """Stop the processes of a fleet whose `fleet up` owner is gone (killed with -9 before it could stop
    them); how many were stopped. A fleet started with `fleet start` has no owner and is left alone."""
    root = root.resolve()
    if not (root / FLEET_FILE).is_file():
        return 0
    fleet = LoopbackFleet.load(root)
    if fleet.owner is None or _pid_alive(fleet.owner):
        return 0
    return sum(stop_process_tree(p.pid) for p in _processes(fleet) if p.alive())


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_fleet(root: Path) -> int:
    """Stop every process the fleet in `root` started (nodes first); how many processes stopped."""
    fleet = LoopbackFleet.load(root.resolve())
    return sum(stop_process_tree(p.pid) for p in _processes(fleet) if p.alive())


def flwr(fleet: LoopbackFleet, *args: str, timeout_s: float | None = 60.0) -> subprocess.CompletedProcess:
    """Run the `flwr` CLI against this fleet's SuperLink (offline, its own FLWR_HOME)."""
    return subprocess.run([_bin("flwr"), *args], env=flower_env(fleet.flwr_home), capture_output=True, text=True,
                          timeout=timeout_s, cwd=PROJECT_DIR)


def fleet_status(root: Path) -> dict[str, Any]:
    """Processes (alive or not), the SuperNodes the SuperLink sees, and its runs."""
    fleet = LoopbackFleet.load(root.resolve())
    status: dict[str, Any] = {
        "superlink": {"address": fleet.address, "pid": fleet.superlink.pid, "alive": fleet.superlink.alive()},
        "nodes": [{"device_id": n.device_id, "pid": n.pid, "alive": n.alive(), "store_dir": n.store_dir}
                  for n in fleet.nodes],
        "connected": None,
        "runs": None,
    }
    if fleet.superlink.alive():
        status["connected"] = _json_rows(flwr(fleet, "supernode", "list", CONNECTION, "--format", "json"), "nodes")
        status["runs"] = _json_rows(flwr(fleet, "ls", CONNECTION, "--format", "json"), "runs")
    return status


def _json_rows(done: subprocess.CompletedProcess, key: str) -> Any:
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        return (done.stdout + done.stderr).strip()
    return data.get(key, data) if isinstance(data, dict) else data


def app_command(root: Path, scenario: Path, output_dir: Path, fleet_kind: str = "nodes") -> tuple[list[str], dict[str, str]]:
    """The `flwr run` command (and its environment) that runs this project on the fleet in `root`."""
    fleet = LoopbackFleet.load(root.resolve())
    if not fleet.superlink.alive():
        raise FleetError(f"the SuperLink of the fleet in {root} is not running: `fedasls fleet start` again")
    run_config = f"scenario={json.dumps(str(scenario))} fleet={json.dumps(fleet_kind)} " \
                 f"output-dir={json.dumps(str(output_dir))}"
    command = [_bin("flwr"), "run", str(PROJECT_DIR), CONNECTION, "--stream", "--run-config", run_config]
    return command, flower_env(fleet.flwr_home)


def run_app(root: Path, scenario: Path, output_dir: Path, fleet_kind: str = "nodes",
            timeout_s: float | None = None) -> int:
    """`flwr run` this project on the fleet in `root` (node-addressed); streams its log; exit code."""
    command, env = app_command(root, scenario, output_dir, fleet_kind)
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    return subprocess.run(command, env=env, cwd=PROJECT_DIR, timeout=timeout_s).returncode


def format_status(status: dict[str, Any]) -> str:
    link = status["superlink"]
    lines = [f"SuperLink {link['address']} pid {link['pid']}: {'running' if link['alive'] else 'stopped'}"]
    for node in status["nodes"]:
        lines.append(f"  SuperNode device {node['device_id']} pid {node['pid']}: "
                     f"{'running' if node['alive'] else 'stopped'} (state in {node['store_dir']})")
    if isinstance(status["connected"], list):
        lines.append(f"connected SuperNodes (as the SuperLink sees them): {len(status['connected'])}")
    elif status["connected"]:
        lines.append(f"connected SuperNodes: {status['connected']}")
    if isinstance(status["runs"], list):
        for run in status["runs"]:
            lines.append(f"  run {run.get('run-id', run.get('run_id', '?'))}: {run.get('status', run)}")
    return "\n".join(lines)


def local_superlink_port() -> int:
    """The port of Flower's managed local SuperLink (`flwr run .` on the default `local` connection)."""
    return int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"))


def stop_local_superlink(port: int | None = None) -> int:
    """Stop the managed local SuperLink that `flwr run .` starts and leaves running (with its
    SuperExec and any app process below it), found as the flower-superlink listening on 127.0.0.1:`port`.
    Returns how many processes stopped (0: none was running)."""
    port = local_superlink_port() if port is None else port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                if "flower-superlink" in " ".join(psutil.Process(conn.pid).cmdline()):
                    return stop_process_tree(conn.pid)
            except psutil.NoSuchProcess:
                return 0
    return 0
