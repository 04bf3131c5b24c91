"""The fleet loop a ServerApp runs: sample available devices, dispatch them to worker slots,
collect replies on the virtual clock, apply the K-fastest / deadline rules, record, checkpoint.

Flower SuperNodes are *worker slots* here, not devices: the sampled device id travels in each
message (pfl-research style), so Flower's per-node cost stays bounded by the cohort while the
population can be millions of devices (Flower's simulation polls and keeps a Context per node).
On the Deployment Engine a node is a real device and replies under its own partition-id.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm import tqdm

from fedasls.config import Settings
from fedasls.heterogeneity import HeterogeneityModel
from server.coordinator import Coordinator
from server.strategy import make_strategy

CHECKPOINT = "checkpoint.json"
ROUNDS_FILE = "rounds.jsonl"
DEVICE_ROUNDS_FILE = "device_rounds.jsonl"
REPLY_POLL_S = 0.05


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
              bar: tqdm | None) -> list[Message]:
    """Send one message per slot and collect replies as they arrive (updating the bar)."""
    messages = [Message(content, dst_node_id=slot, message_type=message_type, group_id=group)
                for slot, content in zip(slots, contents)]
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if bar is not None and got:
            _show_progress(bar, replies)
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
    """Run every round of `run.settings.simulation` on `grid`; returns the run summary."""
    s = run.settings
    sim = s.simulation
    hetero = HeterogeneityModel.from_settings(s.heterogeneity)
    settings_json = s.model_dump_json()
    slots = wait_for_slots(grid, run.expected_slots)
    checkpoint = run.run_dir / CHECKPOINT
    if run.resume and checkpoint.is_file():
        saved = json.loads(checkpoint.read_text())
        coordinator = Coordinator.from_state(saved["coordinator"], hetero)
        run.rounds_done = int(saved["rounds_done"])
    else:
        coordinator = Coordinator(
            population_size=s.population.num_devices,
            heterogeneity=hetero,
            cohort_size=sim.cohort_size,
            overcommit=sim.overcommit,
            deadline_s=sim.deadline_s or None,
            seed=s.heterogeneity.seed,
            sampling=sim.sampling,
        )
        coordinator.clock.now = sim.start_time_s
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
        downlink = strategy.configure(server_round)
        t0 = time.perf_counter()
        now = coordinator.clock.now
        sampled = coordinator.sample(now)
        dropouts = coordinator.draw_dropouts(sampled)
        to_run = [d for d in sampled if d not in dropouts]
        bar = None if run.quiet else tqdm(total=len(to_run), desc=f"round {server_round}/{sim.rounds}", unit="dev")
        replies: list[Message] = []
        for batch in _batches(to_run, len(slots)):
            contents = [RecordDict({**round_config(settings_json, run.store_dir, d, now, server_round), **downlink})
                        for d in batch]
            replies += _dispatch(grid, slots[: len(batch)], contents, "train", str(server_round), bar)
        results, failed = _collect(replies, to_run)
        offline = {d for d, r in results.items() if r["status_code"] != 0} | failed | dropouts
        durations = {d: r["sim_seconds"] for d, r in results.items() if d not in offline}
        outcome = coordinator.close_round(now, durations, offline)
        rows = _device_rows(server_round, now, results, outcome, hetero)
        round_row = _round_row(server_round, now, outcome, rows, failed, time.perf_counter() - t0)
        round_row.update(strategy.aggregate(server_round, replies, outcome.completed))
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
    run.summary = {"wall_seconds": time.perf_counter() - wall0, "rounds": run.rounds_done, "slots": len(slots),
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
        metrics = dict(reply.content["metrics"])
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
