"""Should a device with no adapter of its own use the global adapter? Its user's feedback decides.

A device that has not trained yet (too few labelled items) can use the global adapter or the base
model. Measured on the trend population (README, "Federated"): the global adapter alone helps the
users who share what the fleet learned and costs the others more, because it adds the fleet's
content to everyone's answers. The device has no labels to tell which user it serves, but it has
implicit feedback. `compare_by_feedback` shows the user both models' answers to the device's most
recent buffered questions, side by side (the "which answer do you prefer?" prompt of chat apps),
and the device adopts the global adapter only if the user's reactions favour it:

    value of a reaction: accept 1, edit 0.5, regenerate 0 (SIGNAL_VALUE)
    adopt  <=>  mean value of the global adapter's answers > mean value of the base model's

A tie keeps the base model. Nothing leaves the device: the comparison uses the device's own
questions and its user's reactions, as the implicit feedback of the adaptation step does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedasls.lm.lora import load_adapter_state
from fedasls.pipeline.feedback import Signal, SimulatedUser
from fedasls.interaction import Interaction
from fedasls.lm.model import generate
from fedasls.lm.prompts import PromptFormat

SIGNAL_VALUE: dict[Signal, float] = {"accept": 1.0, "edit": 0.5, "regenerate": 0.0}


@dataclass(frozen=True)
class Adoption:
    """The outcome of a side-by-side comparison on `n` questions."""

    adopt: bool
    global_value: float  # mean reaction value of the global adapter's answers
    base_value: float  # ... and of the base model's
    n: int


def recent_questions(items: Sequence[Interaction], count: int) -> list[Interaction]:
    """The `count` most recent of a device's buffered items (by stream index), oldest first."""
    if count < 1:
        raise ValueError(f"recent_questions: count must be >= 1, got {count}")
    return sorted(items, key=lambda it: it.index)[-count:]


def compare_by_feedback(
    model: torch.nn.Module,
    prompts: PromptFormat,
    user: SimulatedUser,
    items: Sequence[Interaction],
    global_adapter: Mapping[str, torch.Tensor],
    max_new_tokens: int,
) -> Adoption:
    """Answer `items` with the model as it is (for a device with no adapter of its own, the base
    model: a zero LoRA update) and with `global_adapter` loaded, let the user react to both, and
    decide (module docstring).

    Leaves `global_adapter` loaded in `model`; the caller puts the device's own adapter back.
    """
    if not items:
        return Adoption(False, float("nan"), float("nan"), 0)
    questions = [it.question for it in items]
    base = generate(model, prompts, questions, max_new_tokens=max_new_tokens)
    load_adapter_state(model, dict(global_adapter))
    shared = generate(model, prompts, questions, max_new_tokens=max_new_tokens)

    def value(answers: list[str]) -> float:
        return sum(SIGNAL_VALUE[user.react(it, a).signal] for it, a in zip(items, answers)) / len(items)

    global_value, base_value = value(shared), value(base)
    return Adoption(global_value > base_value, global_value, base_value, len(items))
