"""Nested recordings through a context variable: the pattern of the stage timer and the cut counts.

`Recording(name, new, merge)` hands out `record()` blocks: inside one, `current()` is the block's own
record (a new `new()`); when the block ends, its record is merged into the enclosing block's, if any.
Code that notes something asks `current()` and does nothing when it is None, so noting costs
nothing where no one records. Context variables keep threads (batched devices) and Ray workers apart.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Recording(Generic[T]):
    """A kind of nested recording (see the module docstring)."""

    def __init__(self, name: str, new: Callable[[], T], merge: Callable[[T, T], None]):
        self._active: contextvars.ContextVar[T | None] = contextvars.ContextVar(name, default=None)
        self._new, self._merge = new, merge

    @contextlib.contextmanager
    def record(self) -> Iterator[T]:
        """Record into a new record inside the block (merged into an enclosing one at its end)."""
        record = self._new()
        outer = self._active.get()
        token = self._active.set(record)
        try:
            yield record
        finally:
            self._active.reset(token)
            if outer is not None:
                self._merge(outer, record)

    def current(self) -> T | None:
        """The record of the innermost block running now, or None."""
        return self._active.get()
