"""The records every layer shares: one interaction of a user with the on-device model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

STREAM_EPOCH = 1_700_000_000.0  # timestamps are seconds; the virtual clock counts from here

InteractionKind = Literal["chatter", "duplicate", "valuable", "noise", "data"]


@dataclass(frozen=True)
class Interaction:
    """One dialogue set: a question, the base model's generic response, and the user's
    hidden preferred response (revealed only through annotation or feedback).

    `domain` and `kind` are ground truth for tests and analysis; on-device code must
    not read them to make decisions (the device tags domains itself via lexicons).
    """

    device_id: int
    index: int
    timestamp: float
    question: str
    response: str
    preferred: str
    domain: str
    kind: InteractionKind = "data"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Interaction":
        return cls(**data)


@dataclass(frozen=True)
class Persona:
    """A simulated user's hidden traits."""

    device_id: int
    interests: tuple[str, ...]
    style: dict[str, Any] = field(default_factory=dict)
    facts: tuple[str, ...] = ()
    drift_at: int | None = None
    drift_to: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
