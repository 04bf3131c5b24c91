"""Cold-start adoption of the global adapter by implicit feedback, on the tiny real model."""

from __future__ import annotations

import pytest
import torch

from fedasls.adaptation import adapter_state, load_adapter_state
from fedasls.config import FeedbackSettings, Settings
from fedasls.federated.adoption import compare_by_feedback, recent_questions
from fedasls.feedback import SimulatedUser
from fedasls.interaction import Interaction
from fedasls.model import generate
from fedasls.runtime import DeviceRuntime

QUESTIONS = ["How do I water tomato plants?", "What should I pack for a hike?", "How do I start running?",
             "Any tips for a budget dinner?"]


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model_dir):
    settings = Settings.model_validate({"model": {"path": str(tiny_model_dir)}, "adaptation": {"lora_rank": 4}})
    runtime = DeviceRuntime(settings)
    return runtime.activate(4, settings.adaptation), runtime.prompts


def _adapter(model, seed: int) -> dict[str, torch.Tensor]:
    """An adapter whose update changes the answers (B far from zero): the tiny model's base answers
    are punctuation, which ROUGE cannot score, so both sides of a comparison here are adapters."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * (0.5 if "lora_B" in k else 1.0)
            for k, v in adapter_state(model).items()}


def _items(preferred: list[str]) -> list[Interaction]:
    return [Interaction(0, i, float(i), q, "", p, "garden") for i, (q, p) in enumerate(zip(QUESTIONS, preferred))]


def _answers(model, prompts, adapter) -> list[str]:
    load_adapter_state(model, adapter)
    return generate(model, prompts, QUESTIONS, max_new_tokens=12)


def test_the_user_whose_preferences_match_a_model_gets_that_model(model_and_prompts):
    model, prompts = model_and_prompts
    kept, shared = _adapter(model, 3), _adapter(model, 4)
    kept_answers, shared_answers = _answers(model, prompts, kept), _answers(model, prompts, shared)
    assert kept_answers != shared_answers  # otherwise the test below could not tell the models apart
    user = SimulatedUser(FeedbackSettings())

    load_adapter_state(model, kept)
    likes_kept = compare_by_feedback(model, prompts, user, _items(kept_answers), shared, max_new_tokens=12)
    assert not likes_kept.adopt and likes_kept.base_value > likes_kept.global_value and likes_kept.n == 4

    load_adapter_state(model, kept)
    likes_shared = compare_by_feedback(model, prompts, user, _items(shared_answers), shared, max_new_tokens=12)
    assert likes_shared.adopt and likes_shared.global_value > likes_shared.base_value


def test_a_tie_keeps_the_base_model_and_no_items_decide_nothing(model_and_prompts):
    model, prompts = model_and_prompts
    same = _adapter(model, 3)
    answers = _answers(model, prompts, same)
    user = SimulatedUser(FeedbackSettings())
    tie = compare_by_feedback(model, prompts, user, _items(answers), same, max_new_tokens=12)
    assert tie.global_value == tie.base_value and not tie.adopt
    none = compare_by_feedback(model, prompts, user, [], same, max_new_tokens=12)
    assert not none.adopt and none.n == 0


def test_recent_questions_are_the_latest_by_stream_index():
    items = _items(["a", "b", "c", "d"])
    assert [it.index for it in recent_questions(list(reversed(items)), 2)] == [2, 3]
    with pytest.raises(ValueError, match="count must be >= 1"):
        recent_questions(items, 0)
