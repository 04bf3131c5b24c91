"""The fleet loop a ServerApp runs: sample devices, dispatch them through a fleet, collect replies
on the virtual clock, apply the K-fastest / deadline rules, record, checkpoint.

Where devices run is the fleet's business (server/fleets.py): worker slots on the Simulation
Engine (device id in the message, simulated timing) or one SuperNode per device on the Deployment
Engine (learned by QUERY, measured timing). The loop is the same for both.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm import tqdm

from clients.reply import device_metrics
from fedasls.config import Settings
from fedasls.heterogeneity import HeterogeneityModel
from fedasls.simulated_timing import SimulatedTiming
from server.coordinator import Coordinator
from server.fleets import DeviceNodes, Fleet, WorkerSlots
from server.strategy import make_strategy

CHECKPOINT = "checkpoint.json"
ROUNDS_FILE = "rounds.jsonl"
DEVICE_ROUNDS_FILE = "device_rounds.jsonl"

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

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)


def make_fleet(run: FleetRun, hetero: HeterogeneityModel) -> Fleet:
    """The fleet `run.fleet` names, configured from the run's settings."""
    if run.fleet == "slots":
        return WorkerSlots(SimulatedTiming(hetero), run.expected_slots, run.settings.simulation.devices_per_worker)
    if run.fleet == "nodes":
        d = run.settings.deployment
        return DeviceNodes(d.min_nodes, d.reply_timeout_s, d.query_timeout_s, d.wait_s)
    raise ValueError(f"unknown fleet '{run.fleet}': use 'slots' (simulation) or 'nodes' (one SuperNode per device)")


def round_config(settings_json: str, store_dir: Path, device_id: int, now: float, server_round: int,
                 simulated_timing: bool = True) -> RecordDict:
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
        bar.update(sum(1 if r.has_error() else len(device_metrics(r)) for r in got))

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
    """Run every round of `run.settings.simulation` on `grid`; returns the run summary."""
    s = run.settings
    sim = s.simulation
    hetero = HeterogeneityModel.from_settings(s.heterogeneity)
    fleet = make_fleet(run, hetero)
    settings_json = s.model_dump_json()
    fleet.connect(grid)
    checkpoint = run.run_dir / CHECKPOINT
    if run.resume and checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        coordinator = Coordinator.from_state(saved["coordinator"], hetero)
        run.rounds_done = int(saved["rounds_done"])
    else:
        coordinator = new_coordinator(s, hetero, fleet.simulated)
        for name in (ROUNDS_FILE, DEVICE_ROUNDS_FILE):
            (run.run_dir / name).write_text("")

    strategy = make_strategy(s, coordinator.sample_rate, coordinator.sample_rate * coordinator.population_size)
    if run.resume and checkpoint.is_file() and "strategy" in saved:
        strategy.load_state(saved["strategy"], run.run_dir)

    wall0 = time.perf_counter()
    stop_reason = None
    for server_round in range(run.rounds_done + 1, sim.rounds + 1):
        if stop_reason := strategy.stop_reason():
            break
        shared = strategy.configure(server_round)
        t0 = time.perf_counter()
        now = coordinator.clock.now
        sampled = fleet.sample(grid, coordinator, now)
        dropouts = fleet.dropouts(coordinator, sampled)
        to_run = [d for d in sampled if d not in dropouts]
        bar = None if run.quiet else tqdm(total=len(to_run), desc=f"round {server_round}/{sim.rounds}", unit="dev")

        # What each device receives; a round strategy (server/strategy.py) plugs in here.
        def downlink(device_id: int) -> RecordDict:
            content = round_config(settings_json, run.store_dir, device_id, now, server_round, fleet.simulated)
            return RecordDict({**content, **shared})

        sent = fleet.dispatch(grid, to_run, downlink, server_round, _progress(bar))
        results, failed = _collect(sent.replies, to_run)
        failed -= sent.unreachable
        durations = fleet.durations(results)
        for device_id, seconds in durations.items():
            results[device_id]["device_seconds"] = seconds
        offline = {d for d, r in results.items() if r["status_code"] != 0} | failed | dropouts | sent.unreachable
        outcome = coordinator.close_round(now, {d: t for d, t in durations.items() if d not in offline}, offline)
        # ... and a round strategy aggregates the completed replies here (after the round closes).
        rows = _device_rows(server_round, now, results, outcome, hetero)
        round_row = _round_row(server_round, now, outcome, rows, failed, time.perf_counter() - t0)
        round_row.update(strategy.aggregate(server_round, sent.replies, outcome.completed))
        _append_jsonl(run.run_dir / DEVICE_ROUNDS_FILE, rows)
        _append_jsonl(run.run_dir / ROUNDS_FILE, [round_row])
        coordinator.clock.now = max(coordinator.clock.now, now + sim.round_interval_s)
        run.rounds_done = server_round
        _write_atomic(checkpoint, json.dumps({"rounds_done": server_round, "coordinator": coordinator.state(),
                                              "strategy": strategy.state(server_round, run.run_dir)}))
        if bar is not None:
            bar.set_postfix(
                done=len(outcome.completed), strag=len(outcome.stragglers), drop=len(outcome.dropped),
                uplift_r1=f"{round_row['uplift_rouge1_mean']:+.3f}", vt=f"{outcome.round_seconds:.0f}s",
            )
            bar.close()
    run.summary = {"wall_seconds": time.perf_counter() - wall0, "rounds": run.rounds_done, **fleet.describe(),
                   "strategy": strategy.name, "stop_reason": stop_reason}
    if stop_reason and not run.quiet:
        print(f"fedasls: {stop_reason}")
    return run.summary


def _collect(replies: list[Message], expected: list[int]) -> tuple[dict[int, dict[str, float]], set[int]]:
    """Metrics per device id from the replies; devices whose ClientApp failed are returned apart."""
    results: dict[int, dict[str, float]] = {}
    for reply in replies:
        if reply.has_error():
            continue
        for metrics in device_metrics(reply):  # one device, or several run on one worker slot
            results[int(metrics["device_id"])] = metrics
    return results, set(expected) - set(results)


def _device_rows(server_round: int, now: float, results: dict[int, dict[str, float]], outcome: Any,
                 hetero: HeterogeneityModel) -> list[dict[str, Any]]:
    role = {d: "completed" for d in outcome.completed} | {d: "straggler" for d in outcome.stragglers}
    role |= {d: "dropped" for d in outcome.dropped}
    rows = []
    for device_id in outcome.sampled:
        row: dict[str, Any] = {"round": server_round, "now": now, "device_id": device_id,
                               "tier": hetero.profile(device_id).tier, "role": role.get(device_id, "dropped")}
        row.update(results.get(device_id, {}))
        rows.append(row)
    return rows


def _round_row(server_round: int, now: float, outcome: Any, rows: list[dict[str, Any]], failed: set[int],
               wall_s: float) -> dict[str, Any]:
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
        "dropped": len(outcome.dropped),
        "failed": len(failed),
        "adapted": sum(int(r.get("adapted", 0)) for r in done),
        "rouge1_mean": mean("rouge1"),
        "base_rouge1_mean": mean("base_rouge1"),
        "uplift_rouge1_mean": sum(uplift) / len(uplift) if uplift else math.nan,
        "perplexity_mean": mean("perplexity"),
        "base_perplexity_mean": mean("base_perplexity"),
        "accept_rate_mean": mean("accept_rate"),
        "wall_s": wall_s,
    }


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step, so a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=True) + "\n")
