"""Evaluation on a device's held-out future interactions: ROUGE-1/L, perplexity, satisfaction.

Works for base models and peft-wrapped models alike; compare personalized vs base (vs global)
by calling `evaluate` on each. ROUGE comes from rouge-score (one shared scorer per process).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from fedasls.interaction import Interaction
from fedasls.model import format_prompt, generate

if TYPE_CHECKING:
    from fedasls.feedback import SimulatedUser

_SCORER: rouge_scorer.RougeScorer | None = None


def _scorer() -> rouge_scorer.RougeScorer:
    """The process-wide RougeScorer (created on first use)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    return _SCORER


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures of `prediction` against `reference`."""
    scores = _scorer().score(reference, prediction)
    return {"rouge1": scores["rouge1"].fmeasure, "rougeL": scores["rougeL"].fmeasure}


def rouge1_f(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure (symmetric in its two arguments)."""
    return rouge(prediction, reference)["rouge1"]


def score_answers(answers: list[str], references: list[str]) -> tuple[float, float]:
    """Mean ROUGE-1 and ROUGE-L F-measures of answers against references (same length)."""
    if len(answers) != len(references):
        raise ValueError(f"score_answers: {len(answers)} answers but {len(references)} references; pass one answer per reference")
    if not answers:
        raise ValueError("score_answers: no answers to score; pass at least one")
    per_item = [rouge(a, r) for a, r in zip(answers, references)]
    n = len(per_item)
    return sum(s["rouge1"] for s in per_item) / n, sum(s["rougeL"] for s in per_item) / n


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


def _max_positions(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def answer_perplexity(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int = 16) -> float:
    """exp(mean NLL) over the answer tokens of (question, answer) pairs, given the prompt.

    The prompt is `format_prompt(question)`; the answer follows it after one space and ends
    with eos (the training format). Prompt tokens are context only. Sequences longer than the model's context keep the prompt and
    cut the answer.
    """
    if not pairs:
        raise ValueError("answer_perplexity: no (question, answer) pairs; pass at least one")
    limit = _max_positions(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        seqs: list[tuple[list[int], int]] = []  # (ids, prompt length)
        for question, answer in pairs[start : start + batch_size]:
            prompt_ids = tokenizer(format_prompt(question))["input_ids"]
            answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                answer_ids = answer_ids + [tokenizer.eos_token_id]
            ids = prompt_ids + answer_ids
            if limit is not None:
                ids = ids[:limit]
            if len(ids) > len(prompt_ids):
                seqs.append((ids, len(prompt_ids)))
        if not seqs:
            continue
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for row, (ids, plen) in enumerate(seqs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, plen : len(ids)] = torch.tensor(ids[plen:])
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:].to(device)
        nll = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        raise ValueError("answer_perplexity: every answer was empty or cut off by the context length")
    return math.exp(total_nll / total_tokens)


def evaluate(
    model: Any,
    tokenizer: Any,
    heldout: list[Interaction],
    max_new_tokens: int = 32,
    user: "SimulatedUser | None" = None,
    batch_size: int = 16,
) -> EvalResult:
    """Generate answers for held-out questions and score them against the preferred answers.

    rouge1/rougeL: mean F-measures; perplexity: of the preferred answers (answer tokens only);
    accept_rate: share of answers the simulated user accepts (None without a user).
    The model's train/eval mode is restored afterwards.
    """
    if not heldout:
        raise ValueError("evaluate: heldout is empty; pass the device's held-out interactions (population.heldout(i))")
    was_training = model.training
    model.eval()
    try:
        prompts = [format_prompt(item.question) for item in heldout]
        answers = [a.strip() for a in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]
        r1, rl = score_answers(answers, [item.preferred for item in heldout])
        ppl = answer_perplexity(model, tokenizer, [(item.question, item.preferred) for item in heldout], batch_size)
    finally:
        model.train(was_training)
    accept_rate = None
    if user is not None:
        signals = [user.react(item, answer).signal for item, answer in zip(heldout, answers)]
        accept_rate = signals.count("accept") / len(signals)
    return EvalResult(rouge1=r1, rougeL=rl, perplexity=ppl, accept_rate=accept_rate, n=len(heldout))
