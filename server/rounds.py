"""The fleet loop a ServerApp runs: sample devices, dispatch them through a fleet, collect replies
on the virtual clock, apply the K-fastest / deadline rules, record, checkpoint.

Where devices run is the fleet's business (server/fleets.py): worker slots on the Simulation
Engine (device id in the message, simulated timing) or one SuperNode per device on the Deployment
Engine (learned by QUERY, measured timing). The loop is the same for both.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from tqdm import tqdm

from wire.messages import (FETCH_UPDATE, KEEP_UPDATE, device_failures, device_metrics, downlink_records,
                           fetch_records, reply_updates)
from fedasls.config import Settings
from fedasls.device.faults import FailureCode
from fedasls.sim.heterogeneity import HeterogeneityModel
from fedasls.sim.cost_model import CostModel
from fedasls.sim.simulated_timing import SimulatedTiming
from fedasls.device.kept_update import round_token
from fedasls.device.store import ERRORS_LOG, DeviceStore
from server.checkpoint import (
    CHECKPOINT,
    COMMIT_LOCK,
    DEVICE_ROUNDS_FILE,
    ROUNDS_FILE,
    append_jsonl,
    commit_round,
    failure_budget_exceeded,
    mark_run_dir,
    read_checkpoint,
    start_records,
    truncate_records,
    write_checkpoint,
)
from server.coordinator import Coordinator
from server.private_state import dp_secrets
from server.fleets import DeviceNodes, Dispatched, Fleet, WorkerSlots
from server.secagg import secure_aggregation
from server.strategy import fetched_contributions, make_strategy, round_contributions

__all__ = ["CHECKPOINT", "DEVICE_ROUNDS_FILE", "ROUNDS_FILE", "FleetRun", "run_fleet"]
RECEIVED_FILE = "received.jsonl"  # simulation.audit_log: every reply the server received
FAILURE_REASONS = ("error", "corrupt_state", "refused", "unavailable", "no_reply")

FleetKind = Literal["slots", "nodes"]


@dataclass
class FleetRun:
    """Where a run writes, which kind of fleet runs it, and what the loop needs to resume."""

    settings: Settings
    run_dir: Path
    store_dir: Path
    resume: bool = False
    quiet: bool = False
    expected_slots: int = 1  # worker slots: wait for this many SuperNodes before the first round
    fleet: FleetKind = "slots"
    rounds_done: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # when this part of the run began
    wall_before: float = 0.0  # wall seconds of earlier parts (a resumed run), from the checkpoint
    commit_lock: threading.Lock = COMMIT_LOCK  # held while a round is recorded (Ctrl-C waits for it)
    on_reply: Callable[[Message], None] | None = None  # sees every reply the server receives
    failure: str | None = None  # why the run stopped early (too many failed device rounds)

    def __post_init__(self) -> None:
        mark_run_dir(self.run_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)


def make_fleet(run: FleetRun, hetero: HeterogeneityModel) -> Fleet:
    """The fleet `run.fleet` names, configured from the run's settings."""
    if run.fleet == "slots":
        timing = SimulatedTiming(hetero, CostModel(run.settings.cost))
        return WorkerSlots(timing, run.expected_slots, run.settings.simulation.devices_per_worker)
    if run.fleet == "nodes":
        d = run.settings.deployment
        return DeviceNodes(d.min_nodes, d.reply_timeout_s, d.query_timeout_s, d.wait_s)
    raise ValueError(f"unknown fleet '{run.fleet}': use 'slots' (simulation) or 'nodes' (one SuperNode per device)")


def round_config(settings_json: str, store_dir: Path, device_id: int, now: float, server_round: int,
                 simulated_timing: bool = True) -> RecordDict:
    """The config record of one device round: which device, when, and the run's settings."""
    return RecordDict(
        {
            "config": ConfigRecord(
                {
                    "device-id": device_id,
                    "now": now,
                    "server-round": server_round,
                    "settings": settings_json,
                    "store": str(store_dir),
                    "simulated-timing": simulated_timing,
                }
            )
        }
    )


def _progress(bar: tqdm | None) -> Callable[[list[Message]], None]:
    """A reply callback that moves the bar and shows live figures of the replies so far."""
    seen: list[Message] = []

    def on_replies(got: list[Message]) -> None:
        if bar is None:
            return
        seen.extend(got)
        rows = [m for r in seen if not r.has_error() for m in device_metrics(r)]
        if rows:
            uplift = sum(m["rouge1"] - m["base_rouge1"] for m in rows) / len(rows)
            bar.set_postfix(adapted=sum(int(m["adapted"]) for m in rows), uplift_r1=f"{uplift:+.3f}",
                            errors=sum(r.has_error() for r in seen), refresh=False)
        bar.update(sum(1 if r.has_error() else len(device_metrics(r)) + len(device_failures(r)) for r in got))

    return on_replies


def new_coordinator(settings: Settings, hetero: HeterogeneityModel, simulated: bool) -> Coordinator:
    s, sim = settings, settings.simulation
    coordinator = Coordinator(
        population_size=s.population.num_devices,
        heterogeneity=hetero,
        cohort_size=sim.cohort_size,
        overcommit=sim.overcommit,
        deadline_s=sim.deadline_s or None,
        seed=s.heterogeneity.seed,
        simulated_availability=simulated,
        sampling=sim.sampling,
    )
    coordinator.clock.now = sim.start_time_s
    return coordinator


def run_fleet(grid: Grid, run: FleetRun) -> dict[str, Any]:
    """Run every round of `run.settings.simulation` on `grid`; returns the run summary.

    Each round is recorded and checkpointed in one step (server/checkpoint.py); a run whose
    failed device rounds exceed simulation.max_failed_share (or a round in which every device
    failed) stops after recording that round, with `run.failure` saying why."""
    s = run.settings
    sim = s.simulation
    hetero = HeterogeneityModel.from_settings(s.heterogeneity)
    fleet = make_fleet(run, hetero)
    settings_json = s.model_dump_json()
    fleet.connect(grid)
    coordinator, tally, saved = _start_or_restore(run, hetero, fleet.simulated)
    secrets = dp_secrets(s, run.run_dir, resume=saved is not None)  # DP: the noise's and the sample's secrets
    if secrets is not None:
        coordinator.sampling_secret = secrets.sampling
    strategy = make_strategy(s, coordinator.sample_rate, coordinator.sample_rate * coordinator.population_size,
                             secrets)
    fleet = secure_aggregation(s, fleet)  # [federated] secure_aggregation: SecAgg+ rounds
    if saved is not None and "strategy" in saved:
        strategy.load_state(saved["strategy"], run.run_dir)
    if sim.audit_log and run.on_reply is None:
        run.on_reply = _audit(run.run_dir / RECEIVED_FILE)

    stop_reason = None
    for server_round in range(run.rounds_done + 1, sim.rounds + 1):
        if stop_reason := strategy.stop_reason():
            break
        t0 = time.perf_counter()
        now = coordinator.clock.now
        sampled = fleet.sample(grid, coordinator, now)
        dropouts = fleet.dropouts(coordinator, sampled)
        to_run = [d for d in sampled if d not in dropouts]
        downlink = strategy.configure_train(server_round, to_run)  # tensors and knobs (None: a local round)
        shared = {} if downlink is None else downlink_records(downlink)
        bar = None if run.quiet else tqdm(total=len(to_run), desc=f"round {server_round}/{sim.rounds}", unit="dev")
        # Two-phase upload: devices keep their update, bound to this attempt's token, until the round closes.
        token = round_token(server_round) if two_phase(s, downlink is not None) else None

        # What each device receives: its round config and the strategy's downlink.
        def message_for(device_id: int) -> RecordDict:
            content = round_config(settings_json, run.store_dir, device_id, now, server_round, fleet.simulated)
            if token is not None:
                content["config"][KEEP_UPDATE] = token
            return RecordDict({**content, **shared})

        sent = fleet.dispatch(grid, to_run, message_for, server_round, _progress(bar))
        results, failures = _collect(sent, to_run, run.on_reply)
        durations = fleet.durations(results)
        for device_id, seconds in durations.items():
            results[device_id]["device_seconds"] = seconds
        offline = {d for d, r in results.items() if r["status_code"] != 0} | set(failures) | dropouts
        offline |= sent.unreachable
        outcome = coordinator.close_round(now, {d: t for d, t in durations.items() if d not in offline}, offline)
        # ... and a round strategy aggregates the completed replies here (after the round closes).
        phase2: dict[str, Any] = {}
        if token is not None:  # phase 2: only the completed devices that kept an update send it
            contributions, phase2 = _fetch_updates(grid, fleet, run, server_round, token, fetch_records(downlink),
                                                   results, outcome.completed)
            transport: dict[str, float] = {}
        else:
            contributions, transport = round_contributions(sent, outcome.completed)
        rows = _device_rows(server_round, now, results, outcome, hetero, failures)
        round_row = _round_row(server_round, now, outcome, rows, failures, time.perf_counter() - t0) | phase2
        round_row.update(strategy.aggregate_train(server_round, contributions) | transport)
        coordinator.clock.now = max(coordinator.clock.now, now + sim.round_interval_s)
        ran = [d for d in to_run if d not in sent.unreachable]
        _tally(tally, server_round, ran, failures, run.store_dir)
        _record(run, server_round, rows, round_row, coordinator, tally,
                {"strategy": strategy.state(server_round, run.run_dir)})
        _report_failures(server_round, failures)
        if bar is not None:
            bar.set_postfix(
                done=len(outcome.completed), strag=len(outcome.stragglers), drop=len(outcome.dropped),
                fail=len(failures), uplift_r1=f"{round_row['uplift_rouge1_mean']:+.3f}",
                vt=f"{outcome.round_seconds:.0f}s",
            )
            bar.close()
        if failure_budget_exceeded(tally["device_rounds"], tally["failed"], sim.max_failed_share, len(ran),
                                   len(failures)):
            run.failure = _failure_message(tally, sim.max_failed_share, run.run_dir, server_round, len(ran),
                                           len(failures))
            break
    run.summary = {"wall_seconds": _wall(run), "rounds": run.rounds_done, "failed": tally["failed"],
                   "failure": run.failure, **fleet.describe(), "strategy": strategy.name, "stop_reason": stop_reason}
    if stop_reason and not run.quiet:
        print(f"fedasls: {stop_reason}")
    return run.summary


def two_phase(settings: Settings, global_round: bool) -> bool:
    """Whether a round uploads in two phases (simulation.upload): global-adapter rounds without SecAgg+
    (which has its own masked protocol; a local round uploads nothing)."""
    return (global_round and settings.simulation.upload == "two-phase"
            and settings.federated.secure_aggregation == "none")


def _fetch_updates(grid: Grid, fleet: Fleet, run: FleetRun, server_round: int, token: str,
                   layout: dict[str, Any], results: dict[int, dict[str, Any]], completed: list[int]
                   ) -> tuple[list[Any], dict[str, Any]]:
    """Phase 2 of a two-phase round: ask the completed devices that kept an update (withheld_bytes > 0)
    for it, through the same fleet and ClientApp, sending the global adapter's layout (`layout`:
    `fetch_records`), not its tensors again; the guard checks each update as in one phase. Their
    withheld_bytes become sent bytes; a device that sends none (no kept update, no reply) is a dropout,
    counted in `fetch_failed`. Returns the contributions and the round row's phase-2 figures
    (`stage_fetch_s`: the wall seconds phase 2 added to the round)."""
    t0 = time.perf_counter()
    ask = [d for d in completed if int(results[d].get("withheld_bytes", 0)) > 0]
    updates: dict[int, Any] = {}
    failed: dict[int, str] = {}
    if ask:
        def fetch_for(device_id: int) -> RecordDict:
            config = ConfigRecord({"device-id": device_id, "server-round": server_round,
                                   "store": str(run.store_dir), FETCH_UPDATE: token})
            return RecordDict({"config": config, **layout})  # the adapter's layout (for the guard), not its tensors

        sent = fleet.dispatch(grid, ask, fetch_for, server_round)
        _, failures = _collect(sent, ask, run.on_reply)  # phase-2 metrics hold device ids only
        failed = {d: reason for d, (_, reason) in failures.items()} | {d: "unavailable" for d in sent.unreachable}
        for reply in sent.replies:  # (the guard lets a reply hold only the devices its message asked for)
            updates |= {d: u for d, u in reply_updates(reply).items() if d in ask and d not in failed}
    contributions = fetched_contributions(results, updates, completed)
    for d, update in updates.items():
        results[d]["withheld_bytes"] = int(results[d]["withheld_bytes"]) - sum(
            int(t.numel()) * t.element_size() for t in update.values())
    for d, reason in failed.items():
        results[d]["fetch_failure"] = reason
    return contributions, {"fetched": len(updates), "fetch_failed": len(failed),
                           "stage_fetch_s": time.perf_counter() - t0}


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


def _start_or_restore(run: FleetRun, hetero: HeterogeneityModel, simulated: bool
                      ) -> tuple[Coordinator, dict[str, Any], dict[str, Any] | None]:
    """A fresh coordinator and empty records, or (resume) the checkpointed ones, with the
    records cut back to exactly the checkpointed rounds; and the checkpoint read (None if fresh)."""
    if run.resume and (run.run_dir / CHECKPOINT).is_file():
        saved = read_checkpoint(run.run_dir)
        truncate_records(run.run_dir, int(saved["rounds_done"]))
        run.rounds_done = int(saved["rounds_done"])
        run.wall_before = float(saved["wall_seconds"])
        tally = {"device_rounds": saved["device_rounds"], "failed": saved["failed"],
                 "first_failure": saved.get("first_failure")}
        return Coordinator.from_state(saved["coordinator"], hetero), tally, saved
    start_records(run.run_dir)
    fresh = {"device_rounds": 0, "failed": 0, "first_failure": None}
    coordinator = new_coordinator(run.settings, hetero, simulated)
    write_checkpoint(run.run_dir, {"rounds_done": 0, "coordinator": coordinator.state(), "wall_seconds": _wall(run),
                                   **fresh})
    return coordinator, fresh, None


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
            coordinator: Coordinator, tally: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Commit the round: its records, then the checkpoint (one step; see server/checkpoint.py)."""
    checkpoint = {"rounds_done": server_round, "coordinator": coordinator.state(), "wall_seconds": _wall(run),
                  **tally, **(extra or {})}
    commit_round(run.run_dir, rows, round_row, checkpoint, run.commit_lock)
    run.rounds_done = server_round


def _describe(code: int, reason: str) -> str:
    if code in {int(c) for c in FailureCode}:
        return FailureCode(code).message.removeprefix("fedasls: ")
    return {"unavailable": "the device (its SuperNode) was unavailable", "no_reply": "no reply arrived"}.get(
        reason, f"Flower reported error code {code}")


def _report_failures(server_round: int, failures: dict[int, tuple[int, str]]) -> None:
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
    """The per-device results' name for an error code (ours, or Flower's own)."""
    if code in {int(c) for c in FailureCode}:
        return FailureCode(code).reason
    if code in (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return "unavailable"
    return "error"


def _collect(sent: Dispatched, expected: list[int], on_reply: Callable[[Message], None] | None = None
             ) -> tuple[dict[int, dict[str, float]], dict[int, tuple[int, str]]]:
    """Metrics per device id from the replies, and the failed devices with (error code, reason):
    error replies (by the devices their message carried), devices a batch reply lists as failed,
    and devices with no reply at all. Only an error's code is read, never its text."""
    results: dict[int, dict[str, float]] = {}
    failures: dict[int, tuple[int, str]] = {}
    for reply in sent.replies:
        if on_reply is not None:
            on_reply(reply)
        if reply.has_error():
            code = int(reply.error.code)
            for device_id in sent.devices.get(reply.metadata.reply_to_message_id, []):
                failures[device_id] = (code, failure_reason(code))
            continue
        for metrics in device_metrics(reply):  # one device, or several run on one worker slot
            results[int(metrics["device_id"])] = metrics
        for device_id, code in device_failures(reply).items():
            failures[device_id] = (code, failure_reason(code))
    for device_id in expected:
        if device_id not in results and device_id not in failures and device_id not in sent.unreachable:
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
        # uplink the devices sent (metrics + updates) and what stragglers past the deadline did not send
        "uplink_bytes": sum(int(r.get("upload_bytes", 0)) - int(r.get("withheld_bytes", 0)) for r in rows),
        "withheld_bytes": sum(int(r.get("withheld_bytes", 0)) for r in rows),
        # fedasls.lm.cuts: shares of the round's generated prompts and training answers cut to fit the window
        **{f"{name}_cut_share": _share(done, f"{name}_cut", name) for name in ("prompts", "answers", "answer_tokens")},
        "wall_s": wall_s,
    }


def _share(rows: list[dict[str, Any]], part: str, whole: str) -> float:
    """sum(part) / sum(whole) over the rows that report them (NaN when none counted anything)."""
    total = sum(int(r.get(whole, 0)) for r in rows)
    return sum(int(r.get(part, 0)) for r in rows) / total if total else math.nan
