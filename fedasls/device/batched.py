"""A worker's devices run together: their greedy answers and answer losses in shared batches.

`run_batched(model, calls)` runs each call (one device round) in its own thread. The threads take
turns, one at a time, in a fixed order (device order): a thread runs until its device asks for
greedy answers or answer losses (`fedasls.lm.model.generate`, `fedasls.pipeline.training.sequence_loss`,
routed here by `fedasls.lm.batching`), then the next thread runs. Once every unfinished thread waits,
their requests run as batched calls with a LoRA adapter per row (peft's mixed-adapter batches;
`generate_mixed`, `mixed_sequence_losses`), and the threads go on in the same order: answer losses
first (the early stopping's, between training epochs), so that the greedy answers of as many devices
as possible (feedback, gate, evaluation; each row with its own token budget) share one call. Everything else
(training, embedding, loading adapters) runs alone on the thread holding the turn, so the device
code is the same code as in an unbatched worker.

Each thread has its own adapter slots in the shared peft model (`lane_suffix`), so no thread's
weights are touched by another. The model's global state (the active adapter, adapters on or off)
is saved when a thread gives up its turn and restored when it gets it back. The turn order does not
depend on timing, so a batched run repeats exactly; it may differ from an unbatched one where
padding moves a near-tie of greedy decoding (`benchmarks/batch_devices.py` counts how often).

Stage times stay per device: the time a thread waits counts for none of its stages, and each batched
call's time is shared among the requests in it by rows (`StageTimer.paused` / `credit`).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from peft import PeftModel

from fedasls.device import timing
from fedasls.lm import batching
from fedasls.lm.lora import adapters_enabled, set_adapters_enabled
from fedasls.lm.model import generate_mixed
from fedasls.pipeline.training import mixed_sequence_losses

BASE = "__base__"  # peft's adapter name for the base model's rows
_LANE: contextvars.ContextVar[int | None] = contextvars.ContextVar("fedasls_lane", default=None)


def lane_suffix() -> str:
    """The suffix of this thread's adapter slot names ("" outside a batched worker)."""
    lane = _LANE.get()
    return "" if lane is None else f"-lane{lane}"


@dataclass
class _Request:
    lane: int
    kind: str  # "generate" | "loss"
    prompts: Any
    payload: list[Any]  # (question, adapter) rows, or (examples, max_length, adapter) loss requests
    budgets: list[int]  # max_new_tokens per generated row ([] for losses)
    timer: timing.StageTimer | None
    stage: str | None
    result: Any = None
    error: BaseException | None = None


@dataclass
class _Lane:
    active: str | None = None  # the model's active adapter when the thread gave up its turn
    enabled: bool = True
    started: bool = False
    done: bool = False
    request: _Request | None = None
    future: Future = field(default_factory=Future)


class DeviceBatcher:
    """Runs device rounds in turn-taking threads and batches their generation and loss requests."""

    def __init__(self, model: PeftModel, lanes: int) -> None:
        self.model = model
        self._lanes = [_Lane() for _ in range(lanes)]
        self._cond = threading.Condition()
        self._turn: int | None = None  # the lane running now
        self.batches = 0  # batched calls run (for reports)
        self.rows = 0

    # ------------------------------------------------------------------ Route (fedasls.lm.batching)
    def serves(self, model: Any) -> bool:
        return model is self.model

    def generate(self, model: Any, prompts: Any, questions: list[str], max_new_tokens: int) -> list[str]:
        return self._request("generate", prompts, [(q, None) for q in questions], [max_new_tokens] * len(questions))

    def loss(self, model: Any, prompts: Any, examples: list[Any], max_length: int) -> float:
        return self._request("loss", prompts, [(examples, max_length, None)], [])[0]

    def generate_rows(self, model: Any, prompts: Any, rows: list[tuple[str, str]], budgets: Sequence[int]) -> list[str]:
        return self._request("generate", prompts, rows, list(budgets))

    def losses(self, model: Any, prompts: Any, requests: list[tuple[list[Any], int, str]]) -> list[float]:
        return self._request("loss", prompts, requests, [])

    # ------------------------------------------------------------------ turns
    def run(self, calls: Sequence[Callable[[], Any]]) -> list[Future]:
        """Run `calls[i]` on lane i; returns when all finished, one Future (result or error) per call."""
        if len(calls) != len(self._lanes):
            raise ValueError(f"DeviceBatcher has {len(self._lanes)} lanes, got {len(calls)} calls")
        threads = [threading.Thread(target=self._body, args=(i, call), name=f"fedasls-lane{i}", daemon=True)
                   for i, call in enumerate(calls)]
        with self._cond:
            self._turn = 0 if calls else None
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [lane.future for lane in self._lanes]

    def _body(self, lane: int, call: Callable[[], Any]) -> None:
        _LANE.set(lane)
        with self._cond:
            self._cond.wait_for(lambda: self._turn == lane)
            self._lanes[lane].started = True
        set_adapters_enabled(self.model, True)  # a new thread starts from adapters on, whoever ran before
        try:
            with batching.routed(self):
                result = call()
            self._lanes[lane].future.set_result(result)
        except BaseException as err:  # noqa: BLE001 - the caller reads it from the Future
            self._lanes[lane].future.set_exception(err)
        finally:
            with self._cond:
                self._lanes[lane].done = True
                self._pass_turn()

    def _request(self, kind: str, prompts: Any, payload: list[Any], budgets: list[int]) -> Any:
        """Wait for the batch that serves `payload` (rows whose adapter None = the model as this thread has it)."""
        lane = _LANE.get()
        if lane is None:
            raise RuntimeError("a DeviceBatcher route was used outside its threads")
        state = self._lanes[lane]
        state.active, state.enabled = self.model.active_adapter, adapters_enabled(self.model)
        own = state.active if state.enabled else BASE
        payload = [(*item[:-1], own if item[-1] is None else item[-1]) for item in payload]
        timer = timing.current()
        request = _Request(lane, kind, prompts, payload, budgets, timer, timer.innermost() if timer else None)
        with timer.paused() if timer else contextlib.nullcontext():
            with self._cond:
                state.request = request
                self._pass_turn()
                self._cond.wait_for(lambda: self._turn == lane)
        # our turn again: the model as this thread left it
        if self.model.active_adapter != state.active:
            self.model.set_adapter(state.active)
        if adapters_enabled(self.model) != state.enabled:
            set_adapters_enabled(self.model, state.enabled)
        if request.error is not None:
            raise request.error
        return request.result

    def _pass_turn(self) -> None:
        """Give the turn to the first lane that can run (lock held); when every unfinished lane waits on a
        request, run the waiting answer losses first (cheap: the lanes they free go on, e.g. to their
        next training epoch, and may come back with rows for the generation batch), and the waiting
        generation requests once no lane waits on a loss: one batch of greedy answers for as many
        devices as possible."""
        nxt = self._next_runnable()
        waiting = [lane.request for lane in self._lanes if lane.request is not None]
        if nxt is None and waiting:
            batch = [r for r in waiting if r.kind == "loss"] or waiting
            self._run_batch(batch)
            for lane in self._lanes:
                if any(lane.request is r for r in batch):
                    lane.request = None
            nxt = self._next_runnable()
        self._turn = nxt
        self._cond.notify_all()

    def _next_runnable(self) -> int | None:
        for i, lane in enumerate(self._lanes):
            if not lane.done and lane.request is None:
                return i
        return None

    # ------------------------------------------------------------------ batched calls
    def _run_batch(self, requests: list[_Request]) -> None:
        """Run the waiting requests, grouped by kind and prompt format, one call per group (generated rows
        of different token budgets share it: `generate_mixed` keeps each row's own budget)."""
        groups: dict[tuple, list[_Request]] = {}
        for r in requests:
            groups.setdefault((r.kind, id(r.prompts)), []).append(r)
        active, enabled = self.model.active_adapter, adapters_enabled(self.model)
        set_adapters_enabled(self.model, True)  # per-row adapters; "__base__" rows run the base model
        try:
            for (kind, _), group in groups.items():
                wall0, cpu0 = time.perf_counter(), time.process_time()
                try:
                    with batching.routed(None):  # run here, not through a route again
                        if kind == "generate":
                            out = generate_mixed(self.model, group[0].prompts, [row for r in group for row in r.payload],
                                                 [n for r in group for n in r.budgets])
                        else:
                            out = mixed_sequence_losses(self.model, group[0].prompts,
                                                        [item for r in group for item in r.payload])
                    k = 0
                    for r in group:
                        r.result, k = out[k : k + len(r.payload)], k + len(r.payload)
                except Exception as err:  # noqa: BLE001 - each waiting device raises it in its own thread
                    for r in group:
                        r.error = err
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                total = sum(_rows(r) for r in group) or 1
                for r in group:  # each device's stage gets its share of the call, by rows
                    if r.timer is not None and r.stage is not None:
                        share = _rows(r) / total
                        r.timer.credit(r.stage, wall * share, cpu * share)
                self.batches += 1
                self.rows += total
        finally:
            if self.model.active_adapter != active:
                self.model.set_adapter(active)
            set_adapters_enabled(self.model, enabled)


def _rows(request: _Request) -> int:
    return len(request.payload) if request.kind == "generate" else sum(len(item[0]) for item in request.payload)


def run_batched(model: PeftModel, calls: Sequence[Callable[[], Any]]) -> list[Future]:
    """Run the calls (device rounds on a worker whose shared peft model is `model`) with their greedy
    answers and answer losses batched across them; one Future per call, in order."""
    return DeviceBatcher(model, len(calls)).run(calls)
