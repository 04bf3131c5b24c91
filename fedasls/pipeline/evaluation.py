"""Evaluation on a device's held-out future interactions: ROUGE-1/L, perplexity, satisfaction.

Works for base models and peft-wrapped models alike; compare personalized vs base (vs global)
by calling `evaluate` on each. ROUGE comes from fedasls/pipeline/metrics.py (rouge-score, one shared scorer per process).

Long answers: ROUGE-1 of a short answer against a 200-word reference is capped low by recall, so
scoring has two length-aware figures beside it: ROUGE-L recall (how much of the reference an
answer covers, in order) and perplexity, the per-token loss of the user's own answers, whole
(answers longer than the window are scored window by window, fedasls.pipeline.training). With
`reference_cap` the model may answer as long as the references (`answer_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fedasls.pipeline.training import TrainingExample, mixed_sequence_losses, sequence_loss
from fedasls.interaction import Interaction
from fedasls.lm.merged_adapter import merged_adapter
from fedasls.lm.model import eval_mode, generate, generate_mixed
from fedasls.lm.prompts import PromptFormat
from fedasls.pipeline.metrics import mean_scores

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
    rougeL_recall: float = math.nan  # NaN in a state saved before it was measured
    answer_words: float = math.nan  # mean words of the model's answers (NaN: saved before it was measured)
    reference_words: float = math.nan  # mean words of the user's own answers to the same questions

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


REFERENCE_SLACK = 1.25  # new tokens per reference token under evaluation.new_tokens = "reference"


def answer_tokens(prompts: PromptFormat, references: list[str], least: int, cap: int | None) -> int:
    """New tokens for answering items whose references are `references`: `least` without a `cap`,
    else the longest reference's tokens x REFERENCE_SLACK, between `least` and `cap`."""
    if cap is None or not references:
        return least
    longest = max(len(ids) for ids in prompts.tokenizer(references, add_special_tokens=False)["input_ids"])
    return max(least, min(cap, math.ceil(longest * REFERENCE_SLACK)))


def evaluate(
    model: Any,
    prompts: PromptFormat,
    heldout: list[Interaction],
    max_new_tokens: int = 32,
    user: "SimulatedUser | None" = None,
    batch_size: int = 16,
    merge_adapter: bool = True,
    reference_cap: int | None = None,
) -> EvalResult:
    """Generate answers for held-out questions and score them against the preferred answers.

    rouge1/rougeL: mean F-measures; rougeL_recall: mean ROUGE-L recall; perplexity: of the preferred
    answers (answer tokens only); accept_rate: share of answers the simulated user accepts (None
    without a user). With `reference_cap` (evaluation.new_tokens = "reference") answers get
    `answer_tokens(..., max_new_tokens, reference_cap)` new tokens, else `max_new_tokens`.
    The model's train/eval mode is restored afterwards. With `merge_adapter` (evaluation.merge_adapter), a
    peft model's active adapter is merged into the base weights meanwhile (fedasls.lm.merged_adapter; the
    base weights are restored exactly).
    """
    if not heldout:
        raise ValueError("evaluate: heldout is empty; pass the device's held-out interactions (population.heldout(i))")
    with eval_mode(model), merged_adapter(model) if merge_adapter else nullcontext():
        questions, references = [item.question for item in heldout], [item.preferred for item in heldout]
        new_tokens = answer_tokens(prompts, references, max_new_tokens, reference_cap)
        answers = generate(model, prompts, questions, max_new_tokens=new_tokens, batch_size=batch_size)
        scores = mean_scores(answers, references)
        ppl = answer_perplexity(model, prompts, [(item.question, item.preferred) for item in heldout], batch_size)
    accept_rate = None
    if user is not None:
        signals = [user.react(item, answer).signal for item, answer in zip(heldout, answers)]
        accept_rate = signals.count("accept") / len(signals)
    return EvalResult(rouge1=scores["rouge1"], rougeL=scores["rougeL"], perplexity=ppl, accept_rate=accept_rate,
                      n=len(heldout), rougeL_recall=scores["rougeL_recall"], answer_words=mean_words(answers),
                      reference_words=mean_words(references))


def mean_words(texts: list[str]) -> float:
    """Mean whitespace-separated words of `texts` (answer length: a greedy answer much shorter than the
    user's own caps its ROUGE-1 by recall)."""
    return sum(len(t.split()) for t in texts) / len(texts) if texts else math.nan


def adapter_losses(model: Any, prompts: PromptFormat, items: list[Interaction], adapters: list[str]) -> list[float]:
    """Mean answer loss (nats a token) of the preferred answers of `items` under each of several adapters of one
    peft model ("__base__" = the base model): forward passes only, all rows in shared mixed-adapter batches."""
    if not items:
        raise ValueError("adapter_losses: no items; pass the held-back or held-out interactions")
    examples = [TrainingExample(item.question, item.preferred) for item in items]
    limit = _max_positions(model) or _DEFAULT_CONTEXT
    return mixed_sequence_losses(model, prompts, [(examples, limit, name) for name in adapters])


@dataclass(frozen=True)
class KnownAnswers:
    """Greedy answers one model already gave this round (question -> answer), each with `budget` new tokens:
    a scoring call on the same model with the same budget takes them instead of generating them again."""

    budget: int
    answers: Mapping[str, str]


def evaluate_adapters(model: Any, prompts: PromptFormat, heldout: list[Interaction], adapters: list[str],
                      max_new_tokens: int = 32, reference_cap: int | None = None,
                      user: "SimulatedUser | None" = None,
                      known: Mapping[str, KnownAnswers] | None = None) -> list[EvalResult]:
    """`evaluate` of several adapters of one peft model at once, "__base__" = the base model:
    every adapter's greedy answers in shared mixed-adapter batches (`generate_mixed`), their answer losses
    likewise (`mixed_sequence_losses`). One batch of n x k rows costs far less than k batches of n rows on a
    CPU (a decoding step reads the weights once for all rows). Figures equal `evaluate`'s up to float
    rounding (a greedy near-tie can flip under other padding). `known[adapter]` answers already given by an
    adapter are reused where their budget is this call's."""
    if not heldout:
        raise ValueError("evaluate_adapters: heldout is empty; pass the held-back or held-out interactions")
    references = [item.preferred for item in heldout]
    budget = answer_tokens(prompts, references, max_new_tokens, reference_cap)
    rows = [(item.question, name) for name in adapters for item in heldout]
    answers = [_known_answer(known, name, question, budget) for question, name in rows]
    todo = [i for i, answer in enumerate(answers) if answer is None]
    for i, answer in zip(todo, generate_mixed(model, prompts, [rows[i] for i in todo], budget)):
        answers[i] = answer
    losses = adapter_losses(model, prompts, heldout, adapters)
    out = []
    for k, loss in enumerate(losses):
        mine = answers[k * len(heldout) : (k + 1) * len(heldout)]
        scores = mean_scores(mine, references)
        accept_rate = None
        if user is not None:
            signals = [user.react(item, answer).signal for item, answer in zip(heldout, mine)]
            accept_rate = signals.count("accept") / len(signals)
        out.append(EvalResult(rouge1=scores["rouge1"], rougeL=scores["rougeL"], perplexity=math.exp(loss),
                              accept_rate=accept_rate, n=len(heldout), rougeL_recall=scores["rougeL_recall"],
                              answer_words=mean_words(mine), reference_words=mean_words(references)))
    return out


def _known_answer(known: Mapping[str, KnownAnswers] | None, adapter: str, question: str, budget: int) -> str | None:
    """The answer `adapter` already gave to `question` with `budget` new tokens, if `known` holds it."""
    given = known.get(adapter) if known else None
    return given.answers.get(question) if given is not None and given.budget == budget else None
