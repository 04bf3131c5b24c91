"""A Flower grid wrapper for tests: passes every call through and keeps the wire bytes of every reply."""

from __future__ import annotations

from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid


class RecordingGrid:
    """The real grid, passing every call through; keeps the wire bytes of every pulled reply."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.received: list[tuple[str, bytes, object]] = []
        self.mode = ""

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self.received.append((self.mode, message_to_proto(reply).SerializeToString(), reply))
        return replies
