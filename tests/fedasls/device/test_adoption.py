"""Cold-start adoption of the global adapter by implicit feedback, on the tiny real model."""

from __future__ import annotations

import pytest
import torch

from fedasls.lm.lora import adapter_state, load_adapter_state
from fedasls.config import FeedbackSettings, Settings
from fedasls.device.adoption import compare_by_feedback, recent_questions
from fedasls.pipeline.feedback import SimulatedUser
from fedasls.interaction import Interaction
from fedasls.lm.model import generate
from fedasls.device.worker import DeviceRuntime

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


# ----------------------------------------------------------------- in the fleet's device round


@pytest.fixture(scope="module")
def cold_settings(tiny_model_dir) -> Settings:
    return Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": 4, "stream_length": 30, "heldout": 2},
        "synthesis": {"rewrites": 1, "method": "fallback"},
        "adaptation": {"lora_rank": 4, "min_items": 1000},  # never trains: a device without an adapter of its own
        "evaluation": {"max_new_tokens": 12},
        "federated": {"strategy": "global", "cold_adoption": 6},
    })


def _cold_device(cold_settings, runtime, preferred_by):
    """A new device whose buffer holds stream questions whose user prefers `preferred_by(questions)`."""
    from dataclasses import replace

    from fedasls.device.device import Device

    device = Device(0, runtime, cold_settings, lora_rank=2)
    stream = [it for it in runtime.population.stream(0) if it.kind == "valuable"][:6]
    answers = preferred_by([it.question for it in stream])
    device.observe([replace(it, preferred=a) for it, a in zip(stream, answers)])
    assert device.selector.interactions()
    return device


def _downlink_with_update(cold_settings, runtime):
    from dataclasses import replace

    from fedasls.federated.strategies import make_global_strategy
    from fedasls.lm.adapter_layout import adapter_layout

    gen = torch.Generator().manual_seed(4)
    layout = adapter_layout(cold_settings)
    shared = {k: torch.randn(shape, generator=gen) * (0.5 if "lora_B" in k else 1.0) for k, shape in layout.items()}
    strategy = make_global_strategy(cold_settings.federated, layout, cold_settings.adaptation.lora_rank)
    return replace(strategy.configure_train(1, [0]), shared=shared)


def test_a_cold_device_uses_the_global_adapter_only_where_its_user_prefers_it(cold_settings):
    from fedasls.device.device import Device
    from fedasls.device.global_round import adapt_from_global, global_model_adapter

    runtime = DeviceRuntime(cold_settings)
    downlink = _downlink_with_update(cold_settings, runtime)
    model = runtime.activate(2, cold_settings.adaptation)
    alone = global_model_adapter(adapter_state(model), downlink)

    def global_answers(questions):
        load_adapter_state(model, alone)
        return generate(model, runtime.prompts, questions, max_new_tokens=12)

    def base_answers(questions):
        load_adapter_state(model, {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in alone.items()})
        return generate(model, runtime.prompts, questions, max_new_tokens=12)

    likes_global = _cold_device(cold_settings, runtime, global_answers)
    assert adapt_from_global(likes_global, downlink) is None  # nothing trained (min_items)
    assert likes_global.compared == min(6, len(likes_global.selector.interactions()))  # its cost for the virtual clock
    assert likes_global.adapter is None and likes_global.shared_model is not None
    assert all(torch.equal(likes_global.shared_model[k], alone[k]) for k in alone)
    questions = [it.question for it in likes_global.selector.interactions()]
    assert global_answers(questions) != base_answers(questions)  # else the checks below could not tell them apart
    assert generate(likes_global.activate(), runtime.prompts, questions, max_new_tokens=12) == global_answers(questions)
    personal, base = likes_global.evaluate()  # the adopted model is the one evaluated
    assert personal.perplexity != base.perplexity
    restored = Device.from_state(likes_global.to_state(), runtime, cold_settings)
    assert restored.shared_model is not None and all(torch.equal(restored.shared_model[k], alone[k]) for k in alone)

    likes_base = _cold_device(cold_settings, runtime, base_answers)
    adapt_from_global(likes_base, downlink)
    assert likes_base.shared_model is None
    personal, base = likes_base.evaluate()
    assert personal == base
    assert generate(likes_base.activate(), runtime.prompts, questions, max_new_tokens=12) == base_answers(questions)

    # a device with an adapter of its own never uses the adopted one
    likes_global.adapter = {k: v.clone() for k, v in adapter_state(likes_global.activate()).items()}
    adapt_from_global(likes_global, downlink)
    assert likes_global.shared_model is None


def test_cold_adoption_needs_the_global_strategy():
    with pytest.raises(ValueError, match="cold_adoption = 4 needs strategy = 'global'"):
        Settings.model_validate({"federated": {"strategy": "global+personal", "cold_adoption": 4}})
