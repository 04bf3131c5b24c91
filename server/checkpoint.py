"""A run folder's commit point: the per-round records (JSONL) and checkpoint.json.

A round is recorded in one step under a lock: its device rows and round row are appended
(flushed and fsynced), then checkpoint.json is replaced atomically. The checkpoint is the commit:
on resume, records of rounds after its `rounds_done` (a kill between the two writes, or a line
cut short) are dropped, so no round is appended twice and none is lost. Device state written by
an unrecorded round is rolled back by the device store (fedasls/device/store.py), so the rerun of an
interrupted round starts from the state the first attempt started from.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from fedasls.errors import FedaslsError
from fedasls.files import atomic_write

RUN_MARKER = "fedasls-run.json"  # in every run folder: `--overwrite` removes only folders that hold one
CHECKPOINT = "checkpoint.json"
FAILURE_FILE = "failure.txt"  # why the ServerApp stopped a run early (read by `fedasls fleet run`)
ROUNDS_FILE = "rounds.jsonl"
DEVICE_ROUNDS_FILE = "device_rounds.jsonl"
CHECKPOINT_VERSION = 1
_REQUIRED = {"rounds_done": int, "coordinator": dict, "wall_seconds": (int, float), "device_rounds": int,
             "failed": int}


class CheckpointError(FedaslsError):
    """A run folder cannot be resumed: its checkpoint or records are damaged."""


class RunFailed(FedaslsError):
    """Too many device rounds failed; the message names the first failure."""

    exit_code = 1

    def __init__(self, message: str, run: Any = None):
        super().__init__(message)
        self.run = run  # the FleetRun, whose records up to the last round are on disk


COMMIT_LOCK = threading.Lock()  # held while a round is recorded; Ctrl-C waits for it


def mark_run_dir(run_dir: Path) -> None:
    """Create the run folder with its marker (once), so `--overwrite` can tell a run from any other folder;
    the marker holds the run's random id (which names the server's private state, server/private_state.py)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / RUN_MARKER).is_file():
        atomic_write(run_dir / RUN_MARKER, json.dumps({"fedasls_run": 1, "run_id": uuid.uuid4().hex}).encode("utf-8"))


def run_id(run_dir: Path) -> str:
    """The run's random id from its marker (a marker written before ids existed gets one now)."""
    mark_run_dir(run_dir)
    data = json.loads((run_dir / RUN_MARKER).read_text())
    if not isinstance(data, dict) or not str(data.get("run_id", "")).isalnum():
        data = {"fedasls_run": 1, "run_id": uuid.uuid4().hex}
        atomic_write(run_dir / RUN_MARKER, json.dumps(data).encode("utf-8"))
    return str(data["run_id"])


def is_run_dir(run_dir: Path) -> bool:
    """True if `run_dir` holds a fedasls run: its marker, or (a run made before the marker existed) both
    its config.toml and its records."""
    if (run_dir / RUN_MARKER).is_file():
        return True
    return (run_dir / "config.toml").is_file() and ((run_dir / CHECKPOINT).is_file() or (run_dir / ROUNDS_FILE).is_file())


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows, one JSON object a line, and make them durable."""
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def start_records(run_dir: Path) -> None:
    """Empty record files for a fresh run."""
    for name in (ROUNDS_FILE, DEVICE_ROUNDS_FILE):
        atomic_write(run_dir / name, b"")


def commit_round(run_dir: Path, device_rows: list[dict[str, Any]], round_row: dict[str, Any],
                 checkpoint: dict[str, Any], lock: threading.Lock) -> None:
    """Record one round: rows first, then the checkpoint that commits them."""
    with lock:
        append_jsonl(run_dir / DEVICE_ROUNDS_FILE, device_rows)
        append_jsonl(run_dir / ROUNDS_FILE, [round_row])
        write_checkpoint(run_dir, checkpoint)


def write_checkpoint(run_dir: Path, checkpoint: dict[str, Any]) -> None:
    """Atomically replace the run's checkpoint (a fresh run writes one for round 0, before any device runs,
    so a run killed in round 1 can be resumed too)."""
    atomic_write(run_dir / CHECKPOINT, json.dumps({"version": CHECKPOINT_VERSION, **checkpoint}).encode("utf-8"))


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The run's checkpoint, checked; raises CheckpointError naming the file and the fix."""
    path = run_dir / CHECKPOINT
    fix = (f"Fix: the run cannot continue from {path}; start it again without --resume "
           f"(fedasls simulate ... --overwrite --name {run_dir.name}) or restore checkpoint.json from a copy.")
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there, so {run_dir} is not a resumable run folder. "
                              "Fix: pass the folder of an earlier `fedasls simulate` run to --resume.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt (not valid JSON: {err}). {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt (not a JSON object). {fix}")
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise CheckpointError(f"{path} is corrupt or from another version (key '{key}' missing or invalid). {fix}")
    for key in ("rounds_done", "device_rounds", "failed"):
        if data[key] < 0:
            raise CheckpointError(f"{path} is corrupt: '{key}' is negative. {fix}")
    if data["failed"] > data["device_rounds"]:
        raise CheckpointError(f"{path} is corrupt: more failed device rounds than device rounds. {fix}")
    return data


def truncate_records(run_dir: Path, rounds_done: int) -> None:
    """Keep exactly the records of rounds 1..rounds_done (drop an unrecorded round's rows and a
    line cut short); raise CheckpointError if a recorded round is missing."""
    for name in (DEVICE_ROUNDS_FILE, ROUNDS_FILE):
        path = run_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing, though {run_dir / CHECKPOINT} records {rounds_done} rounds. "
                                  "Fix: restore it, or start the run again with --overwrite.")
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept: list[str] = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the last line, cut short by a kill: never committed
                    break
                raise CheckpointError(f"{path}:{number} is not valid JSON. Fix: repair or delete that line, or "
                                      "start the run again with --overwrite.") from None
            if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] <= rounds_done:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            atomic_write(path, "".join(kept).encode("utf-8"))
    recorded = [json.loads(line)["round"] for line in (run_dir / ROUNDS_FILE).read_text().splitlines()]
    if recorded != list(range(1, rounds_done + 1)):
        raise CheckpointError(f"{run_dir / ROUNDS_FILE} records rounds {recorded[:10]}, but the checkpoint says "
                              f"rounds 1..{rounds_done} are done. Fix: start the run again with --overwrite.")


def failure_budget_exceeded(device_rounds: int, failed: int, max_failed_share: float,
                            round_ran: int = 0, round_failed: int = 0) -> bool:
    """Whether a run must stop: every device round so far failed, every device of the last round
    failed (something systemic, e.g. a model the workers cannot load), or more than
    `max_failed_share` of all device rounds failed."""
    if round_ran > 0 and round_failed == round_ran:
        return True
    return device_rounds > 0 and (failed == device_rounds or failed / device_rounds > max_failed_share)
