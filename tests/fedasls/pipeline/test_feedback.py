"""Simulated user: annotation budget, implicit feedback thresholds, feedback -> training examples."""

from __future__ import annotations

import pytest

from fedasls.config import FeedbackSettings
from fedasls.pipeline.feedback import Feedback, SimulatedUser, feedback_examples
from fedasls.interaction import Interaction

PREFERRED = "the cat sat on the mat"  # 6 unigrams, "the" twice


def item(index: int, preferred: str = PREFERRED) -> Interaction:
    return Interaction(
        device_id=3, index=index, timestamp=float(index), question=f"question number {index}?",
        response="generic reply", preferred=preferred, domain="pets",
    )


def f1(overlap: int, n_pred: int, n_ref: int) -> float:
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r) if overlap else 0.0


def test_annotation_budget_is_respected_across_calls_and_reset() -> None:
    user = SimulatedUser(FeedbackSettings(annotation_budget=5), seed=0)
    items = [item(i, preferred=f"preferred {i}") for i in range(4)]
    first = user.annotate(items, budget_left=10)
    assert [(it.index, ans) for it, ans in first] == [(i, f"preferred {i}") for i in range(4)]
    second = user.annotate(items, budget_left=10)
    assert len(second) == 1 and second[0][0] is items[0]
    assert user.annotate(items, budget_left=10) == []
    assert user.annotations_used == 5 and user.budget_remaining == 0
    user.reset_budget()
    assert user.annotations_used == 0
    limited = user.annotate(items, budget_left=2)
    assert [it.index for it, _ in limited] == [0, 1]
    assert user.annotate(items, budget_left=0) == []
    assert user.annotations_used == 2
    with pytest.raises(ValueError, match="budget_left"):
        user.annotate(items, budget_left=-1)


def test_zero_budget_never_annotates() -> None:
    user = SimulatedUser(FeedbackSettings(annotation_budget=0))
    assert user.annotate([item(0), item(1)], budget_left=5) == []


@pytest.mark.parametrize(
    ("answer", "overlap", "n_pred", "signal"),
    [
        ("the cat sat on the mat", 6, 6, "accept"),  # F = 1
        ("the cat", 2, 2, "accept"),  # P=1, R=1/3 -> F = 0.5, exactly the accept threshold
        ("cat", 1, 1, "edit"),  # P=1, R=1/6 -> F = 2/7
        ("the dog", 1, 2, "edit"),  # P=1/2, R=1/6 -> F = 0.25
        ("the dog ran far away", 1, 5, "regenerate"),  # P=1/5, R=1/6 -> F = 2/11
        ("completely unrelated words", 0, 3, "regenerate"),
    ],
)
def test_react_thresholds_match_hand_computed_rouge(answer: str, overlap: int, n_pred: int, signal: str) -> None:
    user = SimulatedUser(FeedbackSettings(accept_threshold=0.5, edit_threshold=0.2), seed=0)
    fb = user.react(item(0), answer)
    assert fb.score == pytest.approx(f1(overlap, n_pred, 6))
    assert fb.signal == signal
    assert fb.answer == answer
    assert fb.target == (PREFERRED if signal == "edit" else None)


def test_react_noise_is_seeded_per_interaction_and_order_free() -> None:
    settings = FeedbackSettings()
    items = [item(i) for i in range(20)]
    a = SimulatedUser(settings, seed=7, noise=0.3)
    b = SimulatedUser(settings, seed=7, noise=0.3)
    forward = [a.react(it, "the cat").score for it in items]
    backward = [b.react(it, "the cat").score for it in reversed(items)][::-1]
    assert forward == backward
    assert all(0.0 <= s <= 1.0 for s in forward)
    assert len(set(forward)) > 1  # noise moves the perceived score away from the exact 0.5
    other = [SimulatedUser(settings, seed=8, noise=0.3).react(it, "the cat").score for it in items]
    assert other != forward


def test_edit_threshold_above_accept_is_rejected() -> None:
    with pytest.raises(ValueError, match="edit_threshold"):
        SimulatedUser(FeedbackSettings(accept_threshold=0.3, edit_threshold=0.6))


def test_feedback_examples_maps_signals_to_weighted_targets() -> None:
    user = SimulatedUser(FeedbackSettings(accept_threshold=0.5, edit_threshold=0.2))
    accepted, edited, regenerated = item(0), item(1), item(2)
    pairs = [
        (accepted, user.react(accepted, "the cat sat on a mat")),
        (edited, user.react(edited, "a dog sat")),
        (regenerated, user.react(regenerated, "nothing in common")),
    ]
    assert [fb.signal for _, fb in pairs] == ["accept", "edit", "regenerate"]
    examples = feedback_examples(pairs)
    assert examples == [
        (accepted.question, "the cat sat on a mat", 0.5),
        (edited.question, PREFERRED, 1.0),
    ]
    assert feedback_examples(pairs, edit_weight=2.0, accept_weight=0.1)[0][2] == 0.1
    with pytest.raises(ValueError, match="no target"):
        feedback_examples([(edited, Feedback("edit", 0.3, None, "x"))])
