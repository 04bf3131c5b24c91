"""Evaluation (ROUGE, perplexity, satisfaction) and the bootstrap confidence interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedasls.config import FeedbackSettings
from fedasls.pipeline.evaluation import EvalResult, answer_perplexity, evaluate
from fedasls.pipeline.metrics import rouge, score_answers
from fedasls.pipeline.feedback import SimulatedUser
from fedasls.interaction import Interaction
from fedasls.lm.model import generate, load_model
from fedasls.lm.prompts import PromptFormat
from fedasls.stats import mean_ci

HELDOUT = [
    Interaction(0, 100 + i, 100.0 + i, q, "generic reply", pref, "cooking")
    for i, (q, pref) in enumerate(
        [
            ("How do I bake bread at home?", "Mix flour, water, salt and yeast, let it rise, then bake it hot."),
            ("What is a good stretch after running?", "Try a calf stretch against a wall for thirty seconds."),
            ("Which plant suits a dark room?", "A snake plant copes well with low light."),
        ]
    )
]


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def test_scoring_helper_matches_hand_computed_rouge() -> None:
    refs = [h.preferred for h in HELDOUT]
    assert score_answers(refs, refs) == (1.0, 1.0)
    # "mat the cat" vs "the cat sat on the mat": ROUGE-1 P=3/3, R=3/6 -> 2/3; LCS "the cat" = 2 -> P=2/3, R=1/3 -> 4/9
    scores = rouge("mat the cat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rougeL"] == pytest.approx(4 / 9)
    r1, rl = score_answers(["mat the cat", "the cat sat on the mat"], ["the cat sat on the mat"] * 2)
    assert (r1, rl) == (pytest.approx((2 / 3 + 1) / 2), pytest.approx((4 / 9 + 1) / 2))
    with pytest.raises(ValueError, match="references"):
        score_answers(["a"], ["a", "b"])


def _manual_nll(model, tokenizer, question: str, answer: str) -> tuple[float, int]:
    """Sum of -log p(answer token) for one unpadded sequence, computed directly."""
    prompt = tokenizer(f"Question: {question}\nAnswer:")["input_ids"]
    target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    nll = -sum(float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(target))
    return nll, len(target)


def test_perplexity_counts_only_answer_tokens_and_ignores_padding(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    pairs = [(h.question, h.preferred) for h in HELDOUT]
    parts = [_manual_nll(model, tokenizer, q, a) for q, a in pairs]
    expected = math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))
    assert answer_perplexity(model, PromptFormat(tokenizer), pairs, batch_size=2) == pytest.approx(expected, rel=1e-4)
    # unbatched: the same value for one sequence alone
    assert answer_perplexity(model, PromptFormat(tokenizer), pairs[:1], batch_size=1) == pytest.approx(
        math.exp(parts[0][0] / parts[0][1]), rel=1e-4
    )


def test_evaluate_returns_sane_numbers_and_leaves_model_alone(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    before = _weights(model)
    result = evaluate(model, PromptFormat(tokenizer), HELDOUT, max_new_tokens=8)
    assert isinstance(result, EvalResult) and result.n == len(HELDOUT)
    assert 0.0 <= result.rouge1 <= 1.0 and 0.0 <= result.rougeL <= 1.0
    assert result.rougeL <= result.rouge1 + 1e-12  # LCS never exceeds unigram overlap
    assert math.isfinite(result.perplexity) and result.perplexity > 1.0
    assert result.accept_rate is None
    assert torch.equal(_weights(model), before) and not model.training
    # answer length beside the user's own (a short answer caps ROUGE-1 against a long reference)
    answers = generate(model, PromptFormat(tokenizer), [it.question for it in HELDOUT], max_new_tokens=8)
    assert result.answer_words == pytest.approx(np.mean([len(a.split()) for a in answers]))
    assert result.reference_words == pytest.approx(np.mean([len(it.preferred.split()) for it in HELDOUT]))

    lenient = SimulatedUser(FeedbackSettings(accept_threshold=0.0, edit_threshold=0.0))
    assert evaluate(model, PromptFormat(tokenizer), HELDOUT, max_new_tokens=8, user=lenient).accept_rate == 1.0
    strict = SimulatedUser(FeedbackSettings(accept_threshold=1.0, edit_threshold=0.5))
    strict_rate = evaluate(model, PromptFormat(tokenizer), HELDOUT, max_new_tokens=8, user=strict).accept_rate
    assert strict_rate is not None and 0.0 <= strict_rate < 1.0
    with pytest.raises(ValueError, match="heldout is empty"):
        evaluate(model, PromptFormat(tokenizer), [], max_new_tokens=8)


def test_evaluate_works_on_peft_wrapped_model(tiny_model_dir) -> None:
    """A fresh LoRA adapter (B = 0) is the identity: same scores as the base model."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_model(tiny_model_dir)
    base_result = evaluate(base, PromptFormat(tokenizer), HELDOUT, max_new_tokens=8)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    result = evaluate(peft_model, PromptFormat(tokenizer), HELDOUT, max_new_tokens=8)
    assert peft_model.training  # mode restored
    assert result.rouge1 == pytest.approx(base_result.rouge1)
    assert result.perplexity == pytest.approx(base_result.perplexity, rel=1e-5)


def test_mean_ci_covers_true_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(100):
        mean, low, high = mean_ci(rng.normal(5.0, 2.0, size=40), n_boot=500)
        assert low <= mean <= high
        covered += low <= 5.0 <= high
    assert 85 <= covered <= 100  # nominal 95 %
    small = mean_ci(rng.normal(5.0, 2.0, size=20))
    large = mean_ci(rng.normal(5.0, 2.0, size=2000))
    assert large[2] - large[1] < (small[2] - small[1]) / 4  # width ~ 1/sqrt(n): 10x here
    assert large[1] <= 5.0 <= large[2]


def test_mean_ci_edge_cases() -> None:
    assert mean_ci([3.5]) == (3.5, 3.5, 3.5)
    mean, low, high = mean_ci([1.0, float("nan"), 3.0, None])
    assert mean == 2.0 and 1.0 <= low <= high <= 3.0
    assert mean_ci([1.0, 2.0, 4.0], seed=3) == mean_ci([1.0, 2.0, 4.0], seed=3)
    with pytest.raises(ValueError, match="no values"):
        mean_ci([float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.5)
