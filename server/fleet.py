"""The fleet loop a ServerApp runs: sample available devices, dispatch them to worker slots,
collect replies on the virtual clock, apply the K-fastest / deadline rules, record, checkpoint.

Flower SuperNodes are *worker slots* here, not devices: the sampled device id travels in each
message (pfl-research style), so Flower's per-node cost stays bounded by the cohort while the
population can be millions of devices (Flower's simulation polls and keeps a Context per node).
On the Deployment Engine a node is a real device and replies under its own partition-id.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from tqdm import tqdm

from fedasls.config import Settings
from fedasls.faults import FailureCode
from fedasls.heterogeneity import HeterogeneityModel
from fedasls.store import ERRORS_LOG, DeviceStore
from server.checkpoint import (
    CHECKPOINT,
    COMMIT_LOCK,
    DEVICE_ROUNDS_FILE,
    ROUNDS_FILE,
    append_jsonl,
    commit_round,
    failure_budget_exceeded,
    read_checkpoint,
    start_records,
    truncate_records,
)
from server.coordinator import Coordinator

__all__ = ["CHECKPOINT", "DEVICE_ROUNDS_FILE", "ROUNDS_FILE", "FleetRun", "run_fleet"]
REPLY_POLL_S = 0.05
RECEIVED_FILE = "received.jsonl"  # simulation.audit_log: every reply the server received
FAILURE_REASONS = ("error", "corrupt_state", "refused", "unavailable", "no_reply")


@dataclass
class FleetRun:
    """Where a run writes, and what the loop needs to resume."""

    settings: Settings
    run_dir: Path
    store_dir: Path
    resume: bool = False
    quiet: bool = False
    expected_slots: int = 1  # wait for this many SuperNodes before the first round
    rounds_done: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # when this part of the run began
    wall_before: float = 0.0  # wall seconds of earlier parts (a resumed run), from the checkpoint
    commit_lock: threading.Lock = COMMIT_LOCK  # held while a round is recorded (Ctrl-C waits for it)
    on_reply: Callable[[Message], None] | None = None  # sees every reply the server receives
    failure: str | None = None  # why the run stopped early (too many failed device rounds)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)


def round_config(settings_json: str, store_dir: Path, device_id: int, now: float, server_round: int) -> RecordDict:
    """The downlink of one device round: which device, when, and the run's settings."""
    return RecordDict(
        {
            "config": ConfigRecord(
                {
                    "device-id": device_id,
                    "now": now,
                    "server-round": server_round,
                    "settings": settings_json,
                    "store": str(store_dir),
                }
            )
        }
    )


def wait_for_slots(grid: Grid, expected: int, timeout_s: float = 120.0, settle_s: float = 1.0) -> list[int]:
    """Node ids of the connected SuperNodes once at least `expected` are there and their number
    has not changed for `settle_s` (they register asynchronously)."""
    deadline = time.monotonic() + timeout_s
    slots: list[int] = []
    stable_since = time.monotonic()
    while True:
        now_slots = sorted(grid.get_node_ids())
        if now_slots != slots:
            slots, stable_since = now_slots, time.monotonic()
        settled = time.monotonic() - stable_since >= settle_s
        if slots and ((len(slots) >= expected and settled) or time.monotonic() > deadline):
            return slots
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SuperNodes connected after {timeout_s:.0f} s: start at least one SuperNode")
        time.sleep(0.2)


def _dispatch(grid: Grid, slots: list[int], contents: list[RecordDict], message_type: str, group: str,
              bar: tqdm | None) -> dict[int, Message]:
    """Send one message per slot and collect replies as they arrive (updating the bar);
    returns each device's reply by device id."""
    messages = [Message(content, dst_node_id=slot, message_type=message_type, group_id=group)
                for slot, content in zip(slots, contents)]
    pending = set(grid.push_messages(messages))
    device_of = {m.metadata.message_id: int(m.content["config"]["device-id"]) for m in messages}
    replies: dict[int, Message] = {}
    while pending:
        got = list(grid.pull_messages(pending))
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
            replies[device_of[reply.metadata.reply_to_message_id]] = reply
        if bar is not None and got:
            _show_progress(bar, list(replies.values()))
            bar.update(len(got))
        if not got:
            time.sleep(REPLY_POLL_S)
    return replies


def _show_progress(bar: tqdm, replies: list[Message]) -> None:
    """Live figures of the replies so far: devices adapted, mean ROUGE-1 uplift, mean device seconds."""
    metrics = [dict(r.content["metrics"]) for r in replies if not r.has_error()]
    if metrics:
        uplift = sum(m["rouge1"] - m["base_rouge1"] for m in metrics) / len(metrics)
        bar.set_postfix(
            adapted=sum(int(m["adapted"]) for m in metrics),
            uplift_r1=f"{uplift:+.3f}",
            dev_s=f"{sum(m['sim_seconds'] for m in metrics) / len(metrics):.0f}",
            errors=len(replies) - len(metrics),
            refresh=False,
        )


def _batches(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_fleet(grid: Grid, run: FleetRun) -> dict[str, Any]:
    """Run every round of `run.settings.simulation` on `grid`; returns the run summary.

    Each round is recorded and checkpointed in one step (server/checkpoint.py); a run whose
    failed device rounds exceed simulation.max_failed_share stops after recording that round,
    with `run.failure` saying why."""
    s = run.settings
    sim = s.simulation
    hetero = HeterogeneityModel.from_settings(s.heterogeneity)
    settings_json = s.model_dump_json()
    slots = wait_for_slots(grid, run.expected_slots)
    coordinator, tally = _start_or_restore(run, hetero)
    if sim.audit_log and run.on_reply is None:
        run.on_reply = _audit(run.run_dir / RECEIVED_FILE)

    for server_round in range(run.rounds_done + 1, sim.rounds + 1):
        t0 = time.perf_counter()
        now = coordinator.clock.now
        sampled = coordinator.sample(now)
        dropouts = coordinator.draw_dropouts(sampled)
        to_run = [d for d in sampled if d not in dropouts]
        bar = None if run.quiet else tqdm(total=len(to_run), desc=f"round {server_round}/{sim.rounds}", unit="dev")
        replies: dict[int, Message] = {}
        for batch in _batches(to_run, len(slots)):
            contents = [round_config(settings_json, run.store_dir, d, now, server_round) for d in batch]
            replies |= _dispatch(grid, slots[: len(batch)], contents, "train", str(server_round), bar)
        results, failures = _collect(replies, to_run, run.on_reply)
        offline = {d for d, r in results.items() if r["status_code"] != 0} | set(failures) | dropouts
        durations = {d: r["sim_seconds"] for d, r in results.items() if d not in offline}
        outcome = coordinator.close_round(now, durations, offline)
        rows = _device_rows(server_round, now, results, outcome, hetero, failures)
        round_row = _round_row(server_round, now, outcome, rows, failures, time.perf_counter() - t0)
        coordinator.clock.now = max(coordinator.clock.now, now + sim.round_interval_s)
        _tally(tally, server_round, to_run, failures, run.store_dir)
        _record(run, server_round, rows, round_row, coordinator, tally)
        _report_failures(server_round, failures, run.store_dir)
        if bar is not None:
            bar.set_postfix(
                done=len(outcome.completed), strag=len(outcome.stragglers), drop=len(outcome.dropped),
                fail=len(failures), uplift_r1=f"{round_row['uplift_rouge1_mean']:+.3f}",
                vt=f"{outcome.round_seconds:.0f}s",
            )
            bar.close()
        if failure_budget_exceeded(tally["device_rounds"], tally["failed"], sim.max_failed_share, len(to_run),
                                   len(failures)):
            run.failure = _failure_message(tally, sim.max_failed_share, run.run_dir, server_round, len(to_run),
                                           len(failures))
            break
    run.summary = {"wall_seconds": _wall(run), "rounds": run.rounds_done, "slots": len(slots),
                   "failed": tally["failed"], "failure": run.failure}
    return run.summary


def _audit(path: Path) -> Callable[[Message], None]:
    """An on_reply hook that appends what each received reply holds to a JSONL file."""

    def write(reply: Message) -> None:
        if reply.has_error():
            row: dict[str, Any] = {"error_code": reply.error.code, "error_reason": reply.error.reason}
        else:
            row = {name: repr(record) for name, record in reply.content.items()}
        append_jsonl(path, [row])

    return write


def _wall(run: FleetRun) -> float:
    """Wall seconds of the whole run so far: earlier parts plus this one."""
    return run.wall_before + time.perf_counter() - run.started


def _start_or_restore(run: FleetRun, hetero: HeterogeneityModel) -> tuple[Coordinator, dict[str, Any]]:
    """A fresh coordinator and empty records, or (resume) the checkpointed ones, with the
    records cut back to exactly the checkpointed rounds."""
    s, sim = run.settings, run.settings.simulation
    if run.resume and (run.run_dir / CHECKPOINT).is_file():
        saved = read_checkpoint(run.run_dir)
        truncate_records(run.run_dir, int(saved["rounds_done"]))
        run.rounds_done = int(saved["rounds_done"])
        run.wall_before = float(saved["wall_seconds"])
        tally = {"device_rounds": saved["device_rounds"], "failed": saved["failed"],
                 "first_failure": saved.get("first_failure")}
        return Coordinator.from_state(saved["coordinator"], hetero), tally
    coordinator = Coordinator(
        population_size=s.population.num_devices,
        heterogeneity=hetero,
        cohort_size=sim.cohort_size,
        overcommit=sim.overcommit,
        deadline_s=sim.deadline_s or None,
        seed=s.heterogeneity.seed,
    )
    coordinator.clock.now = sim.start_time_s
    start_records(run.run_dir)
    return coordinator, {"device_rounds": 0, "failed": 0, "first_failure": None}


def _tally(tally: dict[str, Any], server_round: int, ran: list[int], failures: dict[int, tuple[int, str]],
           store_dir: Path) -> None:
    """Count device rounds run and failed; remember the run's first failure."""
    tally["device_rounds"] += len(ran)
    tally["failed"] += len(failures)
    if failures and tally["first_failure"] is None:
        device_id = min(failures)
        code, reason = failures[device_id]
        log = DeviceStore(store_dir).folder(device_id) / ERRORS_LOG
        tally["first_failure"] = {"round": server_round, "device_id": device_id, "code": code, "reason": reason,
                                  "errors_log": str(log) if log.is_file() else None}


def _record(run: FleetRun, server_round: int, rows: list[dict[str, Any]], round_row: dict[str, Any],
            coordinator: Coordinator, tally: dict[str, Any]) -> None:
    """Commit the round: its records, then the checkpoint (one step; see server/checkpoint.py)."""
    checkpoint = {"rounds_done": server_round, "coordinator": coordinator.state(), "wall_seconds": _wall(run),
                  **tally}
    commit_round(run.run_dir, rows, round_row, checkpoint, run.commit_lock)
    run.rounds_done = server_round


def _describe(code: int, reason: str) -> str:
    if code in {int(c) for c in FailureCode}:
        return FailureCode(code).message.removeprefix("fedasls: ")
    return {"unavailable": "the device (its SuperNode) was unavailable", "no_reply": "no reply arrived"}.get(
        reason, f"Flower reported error code {code}")


def _report_failures(server_round: int, failures: dict[int, tuple[int, str]], store_dir: Path) -> None:
    """One line per failed device on the console (codes only: a device's text never reaches the server)."""
    for device_id in sorted(failures):
        code, reason = failures[device_id]
        line = f"round {server_round}: device {device_id} failed ({reason}): {_describe(code, reason)}"
        if reason == "corrupt_state":
            line += "; it starts afresh the next time it is sampled"
        tqdm.write(line, file=sys.stderr)


def _failure_message(tally: dict[str, Any], max_share: float, run_dir: Path, server_round: int, ran: int,
                     round_failed: int) -> str:
    first = tally["first_failure"] or {}
    n, failed = tally["device_rounds"], tally["failed"]
    if failed == n:
        what = f"every device round failed ({failed} of {n})"
    elif round_failed == ran:
        what = f"every device of round {server_round} failed ({round_failed} of {ran}; {failed} of {n} in the run)"
    else:
        what = f"{failed} of {n} device rounds failed, more than simulation.max_failed_share = {max_share}"
    where = f"; its traceback is in {first['errors_log']}" if first.get("errors_log") else ""
    return (f"the run stopped: {what}. First failure: device {first.get('device_id')} in round "
            f"{first.get('round')}: {_describe(first.get('code', -1), first.get('reason', ''))}{where}. "
            f"Results up to the last round are in {run_dir}. Fix the cause and resume with "
            f"`fedasls simulate --resume {run_dir}`, or raise simulation.max_failed_share to tolerate more failures.")


def failure_reason(code: int) -> str:
    """The per-device results' name for an error reply's code (Flower's own codes included)."""
    if code in {int(c) for c in FailureCode}:
        return FailureCode(code).reason
    if code in (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return "unavailable"
    return "error"


def _collect(replies: dict[int, Message], expected: list[int], on_reply: Callable[[Message], None] | None = None
             ) -> tuple[dict[int, dict[str, float]], dict[int, tuple[int, str]]]:
    """Metrics per device id from the replies, and the failed devices with (error code, reason).

    Only an error reply's code is read, never its text (a device's fixed message, or Flower's)."""
    results: dict[int, dict[str, float]] = {}
    failures: dict[int, tuple[int, str]] = {}
    for device_id, reply in replies.items():
        if on_reply is not None:
            on_reply(reply)
        if reply.has_error():
            failures[device_id] = (int(reply.error.code), failure_reason(int(reply.error.code)))
        else:
            metrics = dict(reply.content["metrics"])
            results[int(metrics["device_id"])] = metrics
    for device_id in expected:
        if device_id not in results and device_id not in failures:
            failures[device_id] = (-1, "no_reply")
    return results, failures


def _device_rows(server_round: int, now: float, results: dict[int, dict[str, float]], outcome: Any,
                 hetero: HeterogeneityModel, failures: dict[int, tuple[int, str]]) -> list[dict[str, Any]]:
    """One row per sampled device; a failed device's role is "failed", with its reason and code."""
    role = {d: "completed" for d in outcome.completed} | {d: "straggler" for d in outcome.stragglers}
    role |= {d: "dropped" for d in outcome.dropped} | {d: "failed" for d in failures}
    rows = []
    for device_id in outcome.sampled:
        code, reason = failures.get(device_id, (None, None))
        row: dict[str, Any] = {"round": server_round, "now": now, "device_id": device_id,
                               "tier": hetero.profile(device_id).tier, "role": role.get(device_id, "dropped"),
                               "failure": reason, "failure_code": code}
        row.update(results.get(device_id, {}))
        rows.append(row)
    return rows


def _round_row(server_round: int, now: float, outcome: Any, rows: list[dict[str, Any]],
               failures: dict[int, tuple[int, str]], wall_s: float) -> dict[str, Any]:
    done = [r for r in rows if r["role"] == "completed"]

    def mean(key: str) -> float:
        vals = [r[key] for r in done if key in r and not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    uplift = [r["rouge1"] - r["base_rouge1"] for r in done]
    return {
        "round": server_round,
        "virtual_start_s": now,
        "virtual_round_s": outcome.round_seconds,
        "sampled": len(outcome.sampled),
        "completed": len(outcome.completed),
        "stragglers": len(outcome.stragglers),
        "dropped": len(outcome.dropped) - len(failures),  # failed devices are counted apart
        "failed": len(failures),
        **{f"failed_{reason}": sum(1 for _, r in failures.values() if r == reason) for reason in FAILURE_REASONS},
        "adapted": sum(int(r.get("adapted", 0)) for r in done),
        "rouge1_mean": mean("rouge1"),
        "base_rouge1_mean": mean("base_rouge1"),
        "uplift_rouge1_mean": sum(uplift) / len(uplift) if uplift else math.nan,
        "perplexity_mean": mean("perplexity"),
        "base_perplexity_mean": mean("base_perplexity"),
        "accept_rate_mean": mean("accept_rate"),
        "wall_s": wall_s,
    }
