"""The safe adaptation step: held-back split, early stopping, minimum items, the gate (real tiny model)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedasls.pipeline.training import LengthBatches, TrainingExample, sequence_loss, train_adapter
from fedasls.lm.lora import attach_lora, shrink_adapter
from fedasls.config import AdaptationSettings, Settings
from fedasls.device.device import Device
from fedasls.pipeline.gate import GateScore, gate_accepts
from fedasls.pipeline.heldback import assign_heldback, near_duplicate_groups, one_per_group
from fedasls.data.population import SyntheticPopulation, near_duplicate
from fedasls.lm.prompts import PromptFormat

from tests.settings_update import updated



def no_feedback(settings: Settings) -> Settings:
    """Training data = the user's annotations only (feedback.use_implicit off)."""
    return updated(settings, feedback={"use_implicit": False})


@pytest.fixture(scope="module")
def settings(make_settings) -> Settings:
    return make_settings(
        population={"num_devices": 20, "stream_length": 60, "heldout": 4},
        selection={"buffer_bytes": 8192},
        feedback={"annotation_budget": 12},
        synthesis={"rewrites": 1, "method": "fallback"},
        adaptation={"epochs": 4, "lora_rank": 4, "learning_rate": 1e-2, "min_items": 4, "gate": "loss",
                    "heldback_min": 3},
        evaluation={"max_new_tokens": 8},
    )


def test_near_duplicates_never_sit_on_both_sides_of_the_split():
    population = SyntheticPopulation(8, stream_length=60)
    rng = np.random.default_rng(0)
    for device_id in range(8):
        items = [it for it in population.stream(device_id) if it.kind != "chatter"]
        # also reworded copies with the same answer (what synthesis and repeated asking produce)
        items += [it.__class__(**{**it.to_dict(), "index": 1000 + it.index,
                                  "question": near_duplicate(rng, it.question)}) for it in items[::3]]
        heldback: set[int] = set()
        trained: set[int] = set()
        for end in range(10, len(items) + 10, 10):  # a growing buffer, split again at each adaptation
            window = items[:end]
            keys = [it.index for it in window]
            pairs = [(it.question, it.preferred) for it in window]
            new = assign_heldback(keys, pairs, heldback, trained, fraction=0.25, minimum=3, seed=device_id)
            assert heldback <= new and len(new) < len(keys)  # once held back, always held back
            # a trained item moves to the held-back side only when a new item joins it to a held-back group
            group = dict(zip(keys, near_duplicate_groups(pairs)))
            for moved in new & trained:
                assert any(group[h] == group[moved] for h in heldback)
            heldback, trained = new, trained | (set(keys) - new)
            for x in window:
                for y in window:
                    if x.index in heldback and y.index not in heldback:
                        assert x.preferred != y.preferred, (x.question, y.question)
        assert heldback and trained


def test_grouping_joins_rewordings_and_keeps_distinct_questions_apart():
    pairs = [
        ("How do I keep basil fresh?", "Wrap it in a damp towel."),
        ("Quick question: how do I keep basil fresh?", "Wrap it in a damp towel."),
        ("How do I keep my basil fresh", "Put the stems in water."),
        ("What is a good warm-up before running?", "Jog lightly for ten minutes."),
        ("Which visa do I need for Japan?", "Check the embassy site."),
    ]
    labels = near_duplicate_groups(pairs)
    assert labels[0] == labels[1] == labels[2]
    assert len({labels[0], labels[3], labels[4]}) == 3


def test_gate_rules():
    good, bad = GateScore(loss=1.0, rouge1=0.6), GateScore(loss=2.0, rouge1=0.4)
    assert gate_accepts("loss", good, bad) and not gate_accepts("loss", bad, good)
    assert gate_accepts("rouge1", good, bad) and not gate_accepts("rouge1", bad, good)
    assert gate_accepts("both", good, bad) and not gate_accepts("both", GateScore(2.5, 0.7), good)
    assert not gate_accepts("rouge1", good, good)  # a tie keeps what the device has
    assert gate_accepts("off", bad, good)
    with pytest.raises(ValueError, match="choose rouge1"):
        gate_accepts("bleu", good, bad)  # type: ignore[arg-type]


def test_early_stopping_stops_and_keeps_the_best_epoch(tiny_lm):
    model, tok = tiny_lm[0], PromptFormat(tiny_lm[1])
    peft_model = attach_lora(copy.deepcopy(model), rank=4, alpha=16, dropout=0.0)
    right = [TrainingExample(f"what is item {k}?", f"item {k} is a small red apple") for k in range(6)]
    # trained on answers that contradict the held-back ones: the held-back loss soon rises
    wrong = [TrainingExample(f"what is thing {k}?", "nothing nothing nothing nothing nothing") for k in range(8)]
    settings = AdaptationSettings(epochs=12, learning_rate=3e-2, batch_size=4, max_length=48, patience=2)
    result = train_adapter(peft_model, tok, wrong, settings, seed=0, heldback=right)
    assert result.stopped_early and len(result.losses) < 12
    assert len(result.heldback_losses) == len(result.losses) == result.best_epoch + settings.patience
    assert result.heldback_losses[result.best_epoch - 1] == min(result.heldback_losses)
    # the adapter is left with the best epoch's weights, not the last epoch's
    assert sequence_loss(peft_model, tok, right, 48) == pytest.approx(min(result.heldback_losses), rel=1e-5)


def test_no_first_adapter_before_min_items(runtime, settings):
    few = updated(settings, feedback={"annotation_budget": 3}, adaptation={"min_items": 5})
    device = Device(2, runtime, no_feedback(few))
    device.catch_up()
    first = device.adapt()
    assert first.status == "waiting" and first.annotated == 3 and first.examples == 0
    assert device.adapter is None and device.counters.gate_waiting == 1
    second = device.adapt()  # a new budget: 6 labelled items now
    assert second.annotated == 6 and second.status in ("accepted", "rejected") and second.examples > 0


def test_a_full_buffer_smaller_than_min_items_does_not_wait_forever(runtime, settings):
    tiny_buffer = updated(settings, selection={"buffer_bytes": 2500}, adaptation={"min_items": 50})
    device = Device(2, runtime, no_feedback(tiny_buffer))
    device.catch_up()
    buffer = device.selector.buffer
    assert buffer.is_full() and 2 <= len(buffer) < 50
    report = device.adapt()
    assert report.annotated == len(buffer) and report.status in ("accepted", "rejected") and report.examples > 0
    # with room left in the buffer, min_items still holds
    roomy = Device(2, runtime, no_feedback(updated(tiny_buffer, selection={"buffer_bytes": 10**6})))
    roomy.catch_up()
    assert not roomy.selector.buffer.is_full() and roomy.adapt().status == "waiting"


def test_a_gate_with_too_few_held_back_items_waits_and_trains_nothing(runtime, settings):
    tiny_buffer = updated(settings, selection={"buffer_bytes": 2500}, adaptation={"min_items": 50})
    decided = Device(2, runtime, no_feedback(tiny_buffer))
    decided.catch_up()
    report = decided.adapt()
    assert report.status in ("accepted", "rejected") and 1 <= report.heldback  # one or two items decided it
    strict = updated(tiny_buffer, adaptation={"gate_min_heldback": report.heldback + 1})
    device = Device(2, runtime, no_feedback(strict))
    device.catch_up()
    waited = device.adapt()
    assert waited.status == "waiting" and waited.examples == 0 and waited.epochs == 0
    assert device.adapter is None and device.counters.gate_waiting == 1
    off = updated(strict, adaptation={"gate": "off"})
    ungated = Device(2, runtime, no_feedback(off))  # no gate: nothing to decide, the minimum does not apply
    ungated.catch_up()
    assert ungated.adapt().status == "accepted"


def test_gate_rejects_an_adapter_trained_on_wrong_answers_and_keeps_the_old_one(runtime, settings):
    device = Device(3, runtime, no_feedback(settings))
    device.catch_up()
    first = device.adapt()
    assert first.status == "accepted" and first.heldback >= 3
    assert first.new_heldback_loss < first.kept_heldback_loss  # it beat the base model
    kept = {k: v.clone() for k, v in device.adapter.items()}
    # the user now labels the training-side items with answers that belong to nothing they asked
    for i in device.trained & set(device.annotations):
        device.annotations[i] = "no idea, sorry, ask me later, bye"
    second = device.adapt()
    assert second.status == "rejected"
    assert second.new_heldback_loss > second.kept_heldback_loss
    assert device.counters.gate_accepted == 1 and device.counters.gate_rejected == 1
    assert all(torch.equal(device.adapter[k], kept[k]) for k in kept)
    # the shared model holds the kept adapter again right after the step, not the rejected one
    probe = [TrainingExample(it.question, it.preferred) for it in device.selector.interactions()[:4]]
    right_after = sequence_loss(runtime.model, runtime.prompts, probe)
    assert sequence_loss(device.activate(), runtime.prompts, probe) == pytest.approx(right_after, rel=1e-6)


def test_gate_margin_needs_a_clear_win():
    kept = GateScore(loss=2.0, rouge1=0.60)
    assert not gate_accepts("rouge1", GateScore(1.0, 0.64), kept, margin=0.05)
    assert gate_accepts("rouge1", GateScore(1.0, 0.66), kept, margin=0.05)
    assert not gate_accepts("loss", GateScore(1.97, 0.9), kept, margin=0.05)
    assert gate_accepts("loss", GateScore(1.9, 0.1), kept, margin=0.05)


def test_held_back_minimum_counts_groups_and_the_gate_sees_one_item_per_group():
    basil = ("How do I keep basil fresh?", "Wrap it in a damp towel.")
    pairs = [basil, ("Quick question: how do I keep basil fresh?", basil[1]), ("Sorry, how do I keep basil fresh?", basil[1]),
             ("What is a good warm-up before running?", "Jog lightly for ten minutes."),
             ("Which visa do I need for Japan?", "Check the embassy site."),
             ("How often should I water tomatoes?", "Deeply, twice a week."),
             ("Should I rebalance my portfolio?", "Once a year."),
             ("How do I stop a toddler tantrum?", "Stay calm and name the feeling.")]
    held = assign_heldback(list(range(8)), pairs, set(), set(), fraction=0.0, minimum=3, seed=0)
    groups = {near_duplicate_groups(pairs)[k] for k in held}
    assert len(groups) == 3 and {0, 1, 2} <= held  # the three rewordings are one group, not three items
    assert one_per_group([pairs[k] for k in sorted(held)]) == [0, 3, 4]


def test_shrink_scales_the_fresh_update_exactly_and_moves_toward_a_start():
    trained = {"x.lora_A.weight": torch.randn(4, 6), "x.lora_B.weight": torch.randn(6, 4)}
    half = shrink_adapter(trained, 0.5)
    assert torch.equal(half["x.lora_A.weight"], trained["x.lora_A.weight"])
    assert torch.allclose(half["x.lora_B.weight"] @ half["x.lora_A.weight"],
                          0.5 * trained["x.lora_B.weight"] @ trained["x.lora_A.weight"])
    start = {k: torch.ones_like(v) for k, v in trained.items()}
    assert torch.allclose(shrink_adapter(trained, 0.25, start)["x.lora_B.weight"],
                          1 + 0.25 * (trained["x.lora_B.weight"] - 1))
    assert torch.equal(shrink_adapter(trained, 1.0, start)["x.lora_B.weight"], trained["x.lora_B.weight"])
    with pytest.raises(ValueError, match="scale must be in"):
        shrink_adapter(trained, 1.5)


def test_device_keeps_the_shrunk_candidate_it_scored(runtime, settings):
    def adapted(scales: list[float]) -> tuple[Device, object]:
        s = settings.model_copy(update={"adaptation": settings.adaptation.model_copy(
            update={"gate": "off", "shrink_scales": scales, "retry_learning_rates": []})})
        device = Device(4, runtime, no_feedback(s))
        device.catch_up()
        return device, device.adapt()

    full, full_report = adapted([1.0])
    half, half_report = adapted([0.5])
    assert full_report.scale == 1.0 and half_report.scale == 0.5
    for key, value in full.adapter.items():
        expected = 0.5 * value if "lora_B" in key else value
        assert torch.allclose(half.adapter[key], expected, atol=1e-7), key
    # with both on offer, the device keeps the one with the better held-back ROUGE-1 (first on a tie)
    both, report = adapted([1.0, 0.5])
    assert report.scale in (1.0, 0.5)
    winner = full if report.scale == 1.0 else half
    assert all(torch.equal(both.adapter[k], winner.adapter[k]) for k in winner.adapter)


def test_length_batches_cover_every_item_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=50).tolist()
    sampler = LengthBatches(lengths, batch_size=8, generator=torch.Generator().manual_seed(1))
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(50)) and len(batches) == len(sampler) == 7
    assert epochs[0] != epochs[1]  # a new order every epoch

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(50, generator=torch.Generator().manual_seed(1)).tolist()
    plain = [shuffled[k:k + 8] for k in range(0, 50, 8)]
    assert padding(epochs[0]) < 0.5 * padding(plain)


@pytest.mark.parametrize("retrain", [[], [3e-3]])
def test_rejected_candidate_is_followed_by_its_own_earlier_epochs_then_retraining(runtime, settings, retrain):
    from fedasls.device.timing import record

    s = updated(settings, adaptation={
        "gate_margin": 10.0, "patience": 10, "shrink_scales": [1.0],  # no candidate can win by 10 nats
        "retry_epochs": [1, 2, 9], "retry_learning_rates": retrain})
    device = Device(5, runtime, no_feedback(s))
    device.catch_up()
    with record() as timer:
        report = device.adapt()
    assert report.status == "rejected" and report.epochs == 4
    # epoch 9 does not exist (4 epochs); the best epoch is the first candidate itself and is not gated twice
    history = device.counters.history[-1]
    assert 1 <= report.best_epoch <= 4
    checkpoints = len({1, 2} - {report.best_epoch})
    assert report.attempts == 1 + checkpoints + len(retrain)
    stages = timer.seconds()
    assert stages["train"].calls == 1 + len(retrain)  # earlier epochs cost no training
    assert stages["gate"].calls == report.attempts  # each candidate (with batch_gate the kept model's score rides along)
    assert history["status"] == "rejected" and device.adapter is None



@pytest.fixture()
def answer_rows(monkeypatch) -> list[int]:
    """The rows of each greedy-answer call the gate makes (`generate_mixed`), in order. A spy, not a mock: it runs
    the real call. How many answers the gate generates does not show in its report, which is the same either way."""
    from fedasls.pipeline import evaluation

    rows: list[int] = []
    real = evaluation.generate_mixed
    monkeypatch.setattr(evaluation, "generate_mixed",
                        lambda model, prompts, batch, *a: rows.append(len(batch)) or real(model, prompts, batch, *a))
    return rows


def test_shrink_by_loss_keeps_the_least_loss_scale_and_answers_only_it(runtime, settings, answer_rows):
    scales = [1.0, 0.5, 0.25]

    def adapted(update: dict) -> object:
        s = updated(settings, adaptation={"gate": "rouge1", "gate_margin": 0.0, "retry_epochs": [],
                                          "retry_learning_rates": [], **update})
        device = Device(4, runtime, no_feedback(s))
        device.catch_up()
        return device.adapt()

    # each scale alone: the same training (same seed), that scale's held-back loss
    losses = {scale: adapted({"shrink_scales": [scale]}).new_heldback_loss for scale in scales}
    assert len(set(losses.values())) == len(scales)  # the scales differ, so the choice means something
    answer_rows.clear()
    report = adapted({"shrink_scales": scales, "shrink_by": "loss"})
    assert report.scale == min(scales, key=lambda scale: losses[scale])
    assert report.new_heldback_loss == pytest.approx(losses[report.scale], abs=1e-4)
    assert answer_rows == [2 * report.heldback]  # the kept model and the chosen scale, not every scale


def test_gate_reuses_the_kept_models_feedback_answers_for_the_same_scores(runtime, settings, answer_rows):
    def adapted(reuse: bool):
        answer_rows.clear()
        s = updated(settings, adaptation={"gate": "rouge1", "gate_margin": 0.0, "retry_epochs": [],
                                          "retry_learning_rates": [], "shrink_scales": [1.0],
                                          "gate_reuses_feedback": reuse})
        device = Device(4, runtime, s)
        device.catch_up()
        return device.adapt(), list(answer_rows)

    (again, again_rows), (reused, reused_rows) = adapted(False), adapted(True)
    assert again.heldback > 0
    assert again_rows == [2 * again.heldback]  # the kept (base) model's answers and the candidate's
    assert reused_rows == [reused.heldback]  # the candidate's alone: the base model answered these in feedback
    for key in ("status", "heldback", "kept_heldback_rouge1", "new_heldback_rouge1", "kept_heldback_loss"):
        assert getattr(reused, key) == getattr(again, key), key
