"""Synthesis: the ROUGE-1 filter, the lexical fallback, the LLM path and the auto switch."""

from __future__ import annotations

import pytest
import torch

from fedasls.pipeline.metrics import rouge1_f
from fedasls.lm.prompts import PromptFormat
from fedasls.config import SynthesisSettings
from fedasls.pipeline.synthesis import (
    PROBE_QUESTIONS,
    PROBE_SEED,
    ParaphraseProbe,
    Synthesizer,
    _clean_rewrite,
    filter_llm_rewrites,
    lexical_fallback,
    llm_rewrites,
    probe_paraphrase,
    rouge_filter,
)

ORIGINAL = "How do I bake bread at home"  # 7 unigrams

QUESTIONS = [
    "How do I bake sourdough bread at home?",
    "What is a good beginner running plan for a 5k race?",
    "Which houseplants are easy to keep alive in low light?",
    "How can I improve my sleep schedule during the week?",
    "What should I pack for a weekend hiking trip?",
]
PAIRS = [(q, f"answer {i}") for i, q in enumerate(QUESTIONS)]


def test_rouge_values_of_hand_chosen_rewrites() -> None:
    assert rouge1_f("how can i bake bread", ORIGINAL) == pytest.approx(2 / 3)  # P=4/5, R=4/7
    assert rouge1_f("how do i bake bread at home quickly", ORIGINAL) == pytest.approx(14 / 15)  # P=7/8, R=1
    assert rouge1_f("bake a cake", ORIGINAL) == pytest.approx(0.2)  # P=1/3, R=1/7
    assert rouge1_f("how do I bake bread at home ??", ORIGINAL) == pytest.approx(1.0)


def test_filter_drops_identical_too_close_unrelated_and_duplicates() -> None:
    candidates = [
        "How do I bake bread at home",  # identical
        "how do i  bake bread at HOME",  # identical up to case/spacing
        "how do I bake bread at home ??",  # F = 1.0 > rouge_max
        "what is the weather in paris today",  # F = 0
        "bake a cake",  # F = 0.2 < rouge_min
        "how can i bake bread",  # F = 2/3: kept
        "How can I bake  bread",  # duplicate of the kept one
        "how do i bake bread at home quickly",  # F = 14/15: kept
        "",
    ]
    assert rouge_filter(ORIGINAL, candidates, 0.3, 0.95) == ["how can i bake bread", "how do i bake bread at home quickly"]
    assert rouge_filter(ORIGINAL, candidates, 0.3, 0.9) == ["how can i bake bread"]
    assert rouge_filter(ORIGINAL, candidates, 0.1, 0.95)[0] == "bake a cake"
    # identical text is never a rewrite, even when the range allows F = 1
    assert "How do I bake bread at home" not in rouge_filter(ORIGINAL, candidates, 0.0, 1.0)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_lexical_fallback_gives_k_distinct_filtered_rewrites_deterministically(k: int) -> None:
    for question in QUESTIONS:
        rewrites = lexical_fallback(question, k, seed=0)
        assert len(rewrites) == k
        assert len({r.lower() for r in rewrites}) == k
        assert question not in rewrites
        assert all(0.3 <= rouge1_f(r, question) <= 0.95 for r in rewrites)
        assert lexical_fallback(question, k, seed=0) == rewrites
    by_seed = [[lexical_fallback(q, k, seed=s) for q in QUESTIONS] for s in (0, 1)]
    assert by_seed[0] != by_seed[1]


def test_fallback_synthesizer_keeps_answers_and_reports_stats() -> None:
    synth = Synthesizer("fallback", k=3, seed=4)
    out = synth.synthesize(None, None, PAIRS)
    assert len(out) == 3 * len(PAIRS)
    for i, (question, answer) in enumerate(PAIRS):
        mine = [q for q, a in out if a == answer]
        assert mine == lexical_fallback(question, 3, seed=4)
    stats = synth.last_stats
    assert (stats.method, stats.kept, stats.generated) == ("fallback", len(out), 3 * len(PAIRS))
    assert Synthesizer("fallback", k=0).synthesize(None, None, PAIRS) == []


def test_llm_rewrites_must_stay_questions_and_lose_their_labels() -> None:
    question = "How do I bake bread at home?"
    answers_instead = ["To bake bread at home, mix flour and water.", "How can I bake bread at home quickly?"]
    assert filter_llm_rewrites(question, answers_instead, 0.3, 0.95) == ["How can I bake bread at home quickly?"]
    assert filter_llm_rewrites("bake bread at home", ["bake some bread at home."], 0.3, 0.95) == ["bake some bread at home."]
    assert _clean_rewrite('Question: "How can I bake bread?"\nMore text') == "How can I bake bread?"
    assert _clean_rewrite("  Rewrite: Where is it?  ") == "Where is it?"


def test_bad_synthesizer_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="method"):
        Synthesizer("paraphrase")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rouge_min"):
        Synthesizer("fallback", rouge_min=0.9, rouge_max=0.5)
    with pytest.raises(ValueError, match="can_paraphrase"):
        Synthesizer("auto")  # the per-model verdict is required, never probed per call


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def test_llm_rewrites_are_filtered_seeded_and_leave_model_and_rng_alone(tiny_lm) -> None:
    model, prompts = tiny_lm[0], PromptFormat(tiny_lm[1])
    before = _weights(model)
    rng_state = torch.get_rng_state()
    synth = Synthesizer("llm", k=3, seed=0, max_new_tokens=12)
    out = synth.synthesize(model, prompts, PAIRS[:2])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.equal(_weights(model), before)
    assert not model.training
    assert synth.last_stats.method == "llm"
    assert synth.last_stats.generated == 3 * 2
    assert synth.last_stats.kept == len(out) <= 6
    originals = dict((a, q) for q, a in PAIRS)
    for rewrite, answer in out:
        assert 0.3 <= rouge1_f(rewrite, originals[answer]) <= 0.95
    raw = [llm_rewrites(model, prompts, QUESTIONS[0], 3, seed=s, max_new_tokens=12) for s in (5, 5, 6)]
    assert len(raw[0]) == 3
    assert raw[0] == raw[1] and raw[0] != raw[2]


def test_auto_runs_the_method_the_models_probe_decided(tiny_lm) -> None:
    model, prompts = tiny_lm[0], PromptFormat(tiny_lm[1])
    llm = Synthesizer("llm", k=3, seed=0, max_new_tokens=12).synthesize(model, prompts, PAIRS)
    fallback = Synthesizer("fallback", k=3, seed=0).synthesize(model, prompts, PAIRS)
    yes = Synthesizer("auto", k=3, seed=0, can_paraphrase=True, max_new_tokens=12)
    no = Synthesizer("auto", k=3, seed=0, can_paraphrase=False)
    assert yes.synthesize(model, prompts, PAIRS) == llm and yes.last_stats.method == "llm"
    assert no.synthesize(model, prompts, PAIRS) == fallback and no.last_stats.method == "fallback"


def test_paraphrase_probe_counts_filtered_rewrites_of_the_fixed_questions(tiny_lm) -> None:
    model, prompts = tiny_lm[0], PromptFormat(tiny_lm[1])
    settings = SynthesisSettings()
    probe = probe_paraphrase(model, prompts, settings, k=2)
    assert probe == probe_paraphrase(model, prompts, settings, k=2)  # seeded: the same verdict on every worker
    assert probe.generated == 2 * len(PROBE_QUESTIONS) and 0 <= probe.kept <= probe.generated
    kept = sum(
        len(filter_llm_rewrites(q, llm_rewrites(model, prompts, q, 2, seed=PROBE_SEED + i), 0.3, 0.95))
        for i, q in enumerate(PROBE_QUESTIONS)
    )
    assert probe.kept == kept
    assert probe.can_paraphrase == (2 * kept >= probe.generated)
    assert ParaphraseProbe(6, 3).can_paraphrase and not ParaphraseProbe(6, 2).can_paraphrase
    assert not ParaphraseProbe(0, 0).can_paraphrase and ParaphraseProbe(8, 2).pass_rate == 0.25
