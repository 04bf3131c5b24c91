"""The adaptation gate: keep a new adapter only if it beats the kept one on held-back items.

Both adapters (or the base model, before the first adapter) are scored on the device's held-back
annotated items (fedasls/pipeline/heldback.py), which no adapter was trained on:

- "loss":   mean answer-token loss of the user's own answers (lower is better);
- "rouge1": mean ROUGE-1 F of greedy answers against the user's answers (higher is better);
- "both":   better on ROUGE-1 and not worse on loss;
- "off":    always keep the new adapter (for measurements).

A tie is not a win: the device keeps what it has. With a `margin`, the new adapter must win by
more than it (ROUGE-1 points for "rouge1" and "both", nats for "loss"): on three to six held-back
questions a small win is mostly noise (measured on the quickstart: adapters that won by <= 0.05
ROUGE-1 were as often worse as better on the held-out future questions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GateMetric = Literal["rouge1", "loss", "both", "off"]


@dataclass(frozen=True)
class GateScore:
    """An adapter's figures on the held-back items."""

    loss: float
    rouge1: float


def gate_accepts(metric: GateMetric, new: GateScore, kept: GateScore, margin: float = 0.0) -> bool:
    """Whether the new adapter replaces the kept one under `metric` (winning by more than `margin`)."""
    if metric == "off":
        return True
    if metric == "loss":
        return new.loss < kept.loss - margin
    if metric == "rouge1":
        return new.rouge1 > kept.rouge1 + margin
    if metric == "both":
        return new.rouge1 > kept.rouge1 + margin and new.loss <= kept.loss
    raise ValueError(f"unknown adaptation.gate '{metric}': choose rouge1, loss, both or off")
