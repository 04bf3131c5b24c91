"""Evaluation on a device's held-out future interactions: ROUGE-1/L, perplexity, satisfaction.

Works for base models and peft-wrapped models alike; compare personalized vs base (vs global)
by calling `evaluate` on each. ROUGE comes from fedasls/pipeline/metrics.py (rouge-score, one shared scorer per process).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fedasls.pipeline.training import TrainingExample, sequence_loss
from fedasls.interaction import Interaction
from fedasls.lm.merged_adapter import merged_adapter
from fedasls.lm.model import eval_mode, generate
from fedasls.lm.prompts import PromptFormat
from fedasls.pipeline.metrics import score_answers

if TYPE_CHECKING:
    from fedasls.pipeline.feedback import SimulatedUser

@dataclass(frozen=True)
class EvalResult:
    """Means over the held-out items. accept_rate is None when no simulated user was given."""

    rouge1: float
    rougeL: float
    perplexity: float
    accept_rate: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEFAULT_CONTEXT = 1024  # for models whose config states no context length


def _max_positions(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def answer_perplexity(model: Any, prompts: PromptFormat, pairs: list[tuple[str, str]], batch_size: int = 16) -> float:
    """exp(mean NLL) over the answer tokens of (question, answer) pairs, given the prompt, in the
    training format (`PromptFormat.example_ids`)."""
    if not pairs:
        raise ValueError("answer_perplexity: no (question, answer) pairs; pass at least one")
    examples = [TrainingExample(question, answer) for question, answer in pairs]
    limit = _max_positions(model) or _DEFAULT_CONTEXT
    return math.exp(sequence_loss(model, prompts, examples, max_length=limit, batch_size=batch_size))


def evaluate(
    model: Any,
    prompts: PromptFormat,
    heldout: list[Interaction],
    max_new_tokens: int = 32,
    user: "SimulatedUser | None" = None,
    batch_size: int = 16,
    merge_adapter: bool = True,
) -> EvalResult:
    """Generate answers for held-out questions and score them against the preferred answers.

    rouge1/rougeL: mean F-measures; perplexity: of the preferred answers (answer tokens only);
    accept_rate: share of answers the simulated user accepts (None without a user).
    The model's train/eval mode is restored afterwards. With `merge_adapter` (evaluation.merge_adapter), a
    peft model's active adapter is merged into the base weights meanwhile (fedasls.lm.merged_adapter; the
    base weights are restored exactly).
    """
    if not heldout:
        raise ValueError("evaluate: heldout is empty; pass the device's held-out interactions (population.heldout(i))")
    with eval_mode(model), merged_adapter(model) if merge_adapter else nullcontext():
        questions = [item.question for item in heldout]
        answers = generate(model, prompts, questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
        r1, rl = score_answers(answers, [item.preferred for item in heldout])
        ppl = answer_perplexity(model, prompts, [(item.question, item.preferred) for item in heldout], batch_size)
    accept_rate = None
    if user is not None:
        signals = [user.react(item, answer).signal for item, answer in zip(heldout, answers)]
        accept_rate = signals.count("accept") / len(signals)
    return EvalResult(rouge1=r1, rougeL=rl, perplexity=ppl, accept_rate=accept_rate, n=len(heldout))
