"""The simulated user: sparse annotation on request and implicit feedback signals.

The user's hidden preference is `Interaction.preferred`. It is revealed only through
`annotate` (a per-adaptation budget, buffered items only) or through `react`, which turns
the ROUGE-1 closeness of a model answer to the preference into accept / edit / regenerate.

Long preferences (`feedback.long_answer_words`): a user whose own answer runs to 200 words judges a
model answer by what it says against as much of their answer, not by its length: the answer is
compared with the preference's first max(answer words, long_answer_words / 2) words. A capped
answer that says what the user would have said is accepted; an unrelated one of any length is not;
a few words that happen to open the preference are still compared with half of long_answer_words.
Preferences up to long_answer_words words (every synthetic one) are compared whole, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedasls.config import FeedbackSettings
from fedasls.pipeline.metrics import rouge1_f
from fedasls.interaction import Interaction

Signal = Literal["accept", "edit", "regenerate"]


@dataclass(frozen=True)
class Feedback:
    """One implicit reaction to a model answer.

    score: the user's perceived closeness (ROUGE-1 F to the preference, plus optional noise,
    clipped to [0, 1]); target: the user's edited answer for "edit", else None;
    answer: the model answer the user reacted to.
    """

    signal: Signal
    score: float
    target: str | None
    answer: str


class SimulatedUser:
    """A device's user, answering annotation requests and reacting to model answers.

    `noise` is the standard deviation of Gaussian noise on the perceived score; it is seeded
    per (seed, device_id, index), so a reaction does not depend on call order.
    """

    def __init__(self, settings: FeedbackSettings, seed: int = 0, noise: float = 0.0) -> None:
        if settings.edit_threshold > settings.accept_threshold:
            raise ValueError(
                f"feedback.edit_threshold ({settings.edit_threshold}) must be <= feedback.accept_threshold "
                f"({settings.accept_threshold}); lower edit_threshold or raise accept_threshold"
            )
        if noise < 0:
            raise ValueError(f"SimulatedUser: noise must be >= 0, got {noise}")
        self.settings = settings
        self.seed = seed
        self.noise = noise
        self.annotations_used = 0

    @property
    def budget_remaining(self) -> int:
        """Annotations still available in the current adaptation."""
        return self.settings.annotation_budget - self.annotations_used

    def reset_budget(self) -> None:
        """Start a new adaptation: the full annotation budget is available again."""
        self.annotations_used = 0

    def annotate(self, items: list[Interaction], budget_left: int) -> list[tuple[Interaction, str]]:
        """The preferred response for the first min(len(items), budget_left, budget_remaining) items.

        The caller passes only buffered items; nothing else is ever annotated.
        """
        if budget_left < 0:
            raise ValueError(f"annotate: budget_left must be >= 0, got {budget_left}")
        n = min(len(items), budget_left, self.budget_remaining)
        self.annotations_used += n
        return [(item, item.preferred) for item in items[:n]]

    def _noise(self, interaction: Interaction) -> float:
        if self.noise == 0.0:
            return 0.0
        rng = np.random.default_rng([self.seed, interaction.device_id, interaction.index])
        return float(rng.normal(0.0, self.noise))

    def reference(self, preferred: str, model_answer: str) -> str:
        """What the user compares `model_answer` with: the preference, or the head of a long one (module docstring)."""
        limit = self.settings.long_answer_words
        words = preferred.split()
        if limit is None or len(words) <= limit:
            return preferred
        return " ".join(words[: max(len(model_answer.split()), limit // 2)])

    def react(self, interaction: Interaction, model_answer: str) -> Feedback:
        """Accept, edit (target = the preferred response) or regenerate, by ROUGE-1 closeness
        (to the head of a long preference, `reference`)."""
        closeness = rouge1_f(model_answer, self.reference(interaction.preferred, model_answer))
        score = min(1.0, max(0.0, closeness + self._noise(interaction)))
        if score >= self.settings.accept_threshold:
            return Feedback("accept", score, None, model_answer)
        if score >= self.settings.edit_threshold:
            return Feedback("edit", score, interaction.preferred, model_answer)
        return Feedback("regenerate", score, None, model_answer)


def feedback_examples(
    pairs: Iterable[tuple[Interaction, Feedback]],
    edit_weight: float = 1.0,
    accept_weight: float = 0.5,
) -> list[tuple[str, str, float]]:
    """Turn implicit feedback into weighted training examples (question, answer, weight).

    edit -> the user's edited answer, weight `edit_weight`; accept -> the accepted model
    answer, weight `accept_weight`; regenerate -> dropped (no usable target).
    """
    out: list[tuple[str, str, float]] = []
    for interaction, fb in pairs:
        if fb.signal == "edit":
            if fb.target is None:
                raise ValueError(f"feedback_examples: edit feedback for item {interaction.index} has no target")
            out.append((interaction.question, fb.target, edit_weight))
        elif fb.signal == "accept":
            out.append((interaction.question, fb.answer, accept_weight))
    return out
