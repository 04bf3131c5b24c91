"""Text-overlap metrics (rouge-score): ROUGE-1 and ROUGE-L F-measures of answers against references,
and ROUGE-L recall, the length-aware one (how much of a long reference an answer covers, in order).

Used by evaluation, the simulated user's feedback and synthesis's rewrite filter.
"""

from __future__ import annotations

from rouge_score import rouge_scorer

_SCORER: rouge_scorer.RougeScorer | None = None


def _scorer() -> rouge_scorer.RougeScorer:
    """The process-wide RougeScorer (created on first use)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    return _SCORER


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures and ROUGE-L recall of `prediction` against `reference`."""
    scores = _scorer().score(reference, prediction)
    return {"rouge1": scores["rouge1"].fmeasure, "rougeL": scores["rougeL"].fmeasure,
            "rougeL_recall": scores["rougeL"].recall}


def rouge1_f(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure (symmetric in its two arguments)."""
    return rouge(prediction, reference)["rouge1"]


def score_answers(answers: list[str], references: list[str]) -> tuple[float, float]:
    """Mean ROUGE-1 and ROUGE-L F-measures of answers against references (same length)."""
    means = mean_scores(answers, references)
    return means["rouge1"], means["rougeL"]


def mean_scores(answers: list[str], references: list[str]) -> dict[str, float]:
    """Means of every `rouge` figure of answers against references (same length)."""
    if len(answers) != len(references):
        raise ValueError(f"score_answers: {len(answers)} answers but {len(references)} references; pass one answer per reference")
    if not answers:
        raise ValueError("score_answers: no answers to score; pass at least one")
    per_item = [rouge(a, r) for a, r in zip(answers, references)]
    return {key: sum(s[key] for s in per_item) / len(per_item) for key in per_item[0]}
