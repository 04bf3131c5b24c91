"""Where a device's greedy answers and answer losses are computed: directly, or by a worker's batcher.

Several devices a worker runs may share one batched model call (`fedasls.device.batched`): each
device runs in its own thread, and `fedasls.lm.model.generate` and
`fedasls.pipeline.training.sequence_loss` hand their work to the thread's `Route` instead of running
it, so that the rows of all the worker's devices run as one batch with a LoRA adapter per row. Code
that calls them does not change. Without a route (the default) they run directly, as always.

`record_answers()` keeps every greedy answer `generate` gives inside the block (both paths), so a
benchmark can compare a batched run with an unbatched one answer by answer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any, Protocol


class Route(Protocol):
    """What a worker's batcher offers a device thread (see fedasls.device.batched.DeviceBatcher)."""

    def serves(self, model: Any) -> bool:
        """Whether this route runs calls on `model` (the worker's shared peft model)."""

    def generate(self, model: Any, prompts: Any, questions: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers of the model's active adapter (or the base model, when adapters are disabled)."""

    def loss(self, model: Any, prompts: Any, examples: list[Any], max_length: int) -> float:
        """Mean answer-token loss (as `sequence_loss`) of the model's active adapter."""

    def generate_rows(self, model: Any, prompts: Any, rows: list[tuple[str, str]], budgets: Sequence[int]) -> list[str]:
        """Greedy answers to (question, adapter name) rows, each with its own token budget (as `generate_mixed`)."""

    def losses(self, model: Any, prompts: Any, requests: list[tuple[list[Any], int, str]]) -> list[float]:
        """Mean answer-token loss of each (examples, max_length, adapter name) request (as `mixed_sequence_losses`)."""


_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("fedasls_route", default=None)
_ANSWERS: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("fedasls_answers",
                                                                                        default=None)


def route_for(model: Any) -> Route | None:
    """The route that serves `model` in this thread, or None (then run directly)."""
    route = _ROUTE.get()
    return route if route is not None and route.serves(model) else None


@contextlib.contextmanager
def routed(route: Route | None) -> Iterator[None]:
    """Send this thread's generate / sequence_loss calls on the route's model to `route` inside the block
    (None: run them directly)."""
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


@contextlib.contextmanager
def record_answers() -> Iterator[list[tuple[str, str]]]:
    """Collect (question, answer) of every greedy answer `generate` gives in this thread inside the block."""
    log: list[tuple[str, str]] = []
    token = _ANSWERS.set(log)
    try:
        yield log
    finally:
        _ANSWERS.reset(token)


def note_answers(questions: list[str], answers: list[str]) -> None:
    """Add answers to the recording `record_answers` log, if any (called by `generate`)."""
    log = _ANSWERS.get()
    if log is not None:
        log.extend(zip(questions, answers))
