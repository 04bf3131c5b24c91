"""What a killed command leaves behind is cleaned up, and oversized records are warned about."""

from __future__ import annotations

import subprocess
import sys

import psutil

from fedasls.data.loaders import Record
from simulations.loopback import FleetProcess, LoopbackFleet, stop_orphaned_fleet
from simulations.validation import MAX_RECORD_CHARS, warn_oversized


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_fleet_whose_fleet_up_was_killed_is_stopped_by_the_next_fleet_call(tmp_path):
    procs = [_sleeper() for _ in range(3)]
    try:
        def fleet(owner: int | None) -> LoopbackFleet:
            link = FleetProcess("superlink", procs[0].pid, 1, "log")
            nodes = [FleetProcess("supernode", p.pid, 2, "log", device_id=i) for i, p in enumerate(procs[1:])]
            return LoopbackFleet(tmp_path, link, nodes, owner)

        fleet(None).save()  # started by `fleet start`: the user stops it
        assert stop_orphaned_fleet(tmp_path) == 0
        fleet(psutil.Process().pid).save()  # its `fleet up` is still running
        assert stop_orphaned_fleet(tmp_path) == 0 and all(p.poll() is None for p in procs)
        fleet(_dead_pid()).save()  # its `fleet up` was killed with -9
        assert stop_orphaned_fleet(tmp_path) == 3
        for p in procs:
            p.wait(timeout=10)
        assert not any(psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE
                       for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_an_oversized_record_is_kept_with_a_warning_that_quotes_nothing(capsys):
    secret = "My bank PIN is 4321 "
    records = [Record("q", "", "short answer", None, None, "x.jsonl", 1),
               Record("q", "", secret * (MAX_RECORD_CHARS // len(secret) + 10), None, None, "x.jsonl", 2)]
    assert warn_oversized(records, "x.jsonl") == 1
    err = capsys.readouterr().err
    assert "1 record(s) hold more than" in err and "line 2" in err and "4321" not in err
    assert warn_oversized(records[:1], "x.jsonl") == 0
