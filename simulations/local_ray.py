"""The Ray a run starts for itself: private, never a stale cluster, and cleaned up even after kill -9.

`ray.init()` without an address connects to whatever cluster the machine's Ray address file names
(`<ray tmp>/ray_current_cluster`, left behind by `ray start` or by a cluster stopped by pid), and
then refuses `num_cpus` and hangs the run. So a run that does not attach to a cluster on purpose
starts a new local Ray (`address="local"`) in a private temp folder of its own. The folder holds
the owner's pid: the next run stops the Ray processes of any folder whose owner is gone (a run
killed with -9) and removes the folder. (Ray 2.55's GCS and raylet listen on all interfaces
whatever node IP is given, and turn 127.0.0.1 into the machine's address: binding them to loopback
is not in our hands.)
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import psutil

PREFIX = "fedasls-ray-"
OWNER_FILE = "owner.pid"


def _base() -> str:
    """Where private folders go: /tmp (short: Ray's socket paths must stay under ~107 characters)."""
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


_CURRENT: list[Path] = []  # this process's private folder while its Ray runs


def private_ray_dir() -> Path:
    """A fresh private Ray temp folder owned by this process (orphans of killed runs are reaped first)."""
    reap_orphans()
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=_base()))
    (folder / OWNER_FILE).write_text(str(os.getpid()))
    _CURRENT[:] = [folder]
    return folder


def stop_current() -> bool:
    """Ctrl-C: stop this process's own Ray by pid (calling Ray's shutdown from a signal handler can
    end the process with Ray's exit code instead of ours) and remove its folder. False if this
    process runs no private Ray (e.g. it is attached to a cluster)."""
    if not _CURRENT:
        return False
    folder = _CURRENT.pop()
    _kill_processes_naming({folder})
    remove(folder)
    return True


def local_init_args(temp_dir: Path) -> dict[str, str]:
    """`ray.init` arguments for a private local Ray: a new instance, never an existing cluster."""
    return {"address": "local", "_temp_dir": str(temp_dir)}


def _owner_alive(folder: Path) -> bool:
    try:
        pid = int((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_orphans() -> int:
    """Stop Ray processes whose private folder's owner is gone, and remove such folders. Returns the
    number of processes stopped."""
    orphaned = {f for f in Path(_base()).glob(f"{PREFIX}*") if f.is_dir() and not _owner_alive(f)}
    if not orphaned:
        return 0
    stopped = _kill_processes_naming(orphaned)
    for folder in orphaned:
        shutil.rmtree(folder, ignore_errors=True)
    return stopped


def _kill_processes_naming(folders: set[Path]) -> int:
    """Kill every other process whose command line names one of these private folders; how many."""
    pattern = re.compile(re.escape(_base().rstrip("/")) + "/" + re.escape(PREFIX) + r"[A-Za-z0-9_]+")
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            named = {Path(m) for arg in proc.info["cmdline"] or [] for m in pattern.findall(arg)}
        except (psutil.Error, TypeError):
            continue
        if named & folders and proc.pid != os.getpid():
            victims.append(proc)
    for proc in victims:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=5)
    return len(victims)


def remove(folder: Path) -> None:
    """Remove this run's private folder once its Ray has stopped."""
    if folder in _CURRENT:
        _CURRENT.remove(folder)
    shutil.rmtree(folder, ignore_errors=True)
