"""User profile: streaming statistics against hand-computed values, drift and the re-tune trigger."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedasls.interaction import Interaction
from fedasls.data.lexicon import default_lexicons, tokenize
from fedasls.data.population import SyntheticPopulation
from fedasls.pipeline.profile import UserProfile
from fedasls.pipeline.selection import item_text

DOMAINS = ("cooking", "fitness", "travel")


def _inter(i: int, question: str) -> Interaction:
    return Interaction(0, i, float(i), question, "resp", "pref", "cooking")


def test_centroid_is_a_bias_corrected_ema_of_unit_embeddings():
    p = UserProfile(DOMAINS, ema=0.25)
    p.observe(_inter(0, "a"), np.array([2.0, 0.0]), "cooking")
    assert np.allclose(p.centroid, [1.0, 0.0])
    p.observe(_inter(1, "a"), np.array([0.0, 5.0]), "cooking")  # rate max(0.25, 1/2) = 0.5
    assert np.allclose(p.centroid, [0.5, 0.5])
    p.observe(_inter(2, "a"), np.array([0.0, 3.0]), "cooking")  # rate max(0.25, 1/3)
    assert np.allclose(p.centroid, [0.5 * 2 / 3, 0.5 * 2 / 3 + 1 / 3])
    for i in range(3, 6):  # rate is now 0.25
        p.observe(_inter(i, "a"), np.array([1.0, 0.0]), "cooking")
    expected = np.array([1 / 3, 2 / 3])
    for _ in range(3):
        expected = 0.75 * expected + 0.25 * np.array([1.0, 0.0])
    assert np.allclose(p.centroid, expected)


def test_domain_histogram_style_and_feedback_statistics():
    p = UserProfile(DOMAINS, ema=0.5, chatter_max_words=2)
    p.observe(_inter(0, "hi"), np.ones(3), "general")  # chatter: no interest
    p.observe(_inter(1, "how do I bake bread fast"), np.ones(3), "cooking")
    p.observe(_inter(2, "best gym plan"), np.ones(3), "fitness")
    p.observe(_inter(3, "thanks a lot"), np.ones(3), "general")
    assert p.domain_counts == {"cooking": 1, "fitness": 1, "travel": 0}
    # tagged items only: first sets [1, 0, 0], second has rate max(0.5, 1/2) -> [0.5, 0.5, 0]
    assert p.interest_weights() == pytest.approx({"cooking": 0.5, "fitness": 0.5, "travel": 0.0})
    p.observe(_inter(4, "gym again"), np.ones(3), "fitness")  # rate 0.5 -> [0.25, 0.75, 0]
    assert p.interest_weights() == pytest.approx({"cooking": 0.25, "fitness": 0.75, "travel": 0.0})
    assert p.mean_question_words == pytest.approx((1 + 6 + 3 + 3 + 2) / 5)
    assert p.chatter_share == pytest.approx(2 / 5)  # "hi", "gym again"
    for s in ("accept", "accept", "edit", "regenerate"):
        p.record_feedback(s)
    assert p.feedback == {"accept": 2, "edit": 1, "regenerate": 1}
    assert p.accept_rate == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown signal"):
        p.record_feedback("like")
    with pytest.raises(ValueError, match="unknown domain"):
        p.observe(_inter(5, "x"), np.ones(3), "astronomy")
    with pytest.raises(ValueError, match="embedding dim"):
        p.observe(_inter(5, "x"), np.ones(4), "cooking")


def test_drift_is_cosine_distance_and_total_variation_since_adaptation():
    p = UserProfile(DOMAINS, ema=1.0)  # no memory: the profile is the last interaction
    assert p.drift() == 0.0  # nothing to compare with before the first adaptation
    p.observe(_inter(0, "a"), np.array([1.0, 0.0]), "cooking")
    p.mark_adapted()
    p.observe(_inter(1, "a"), np.array([1.0, 1.0]), "cooking")
    assert p.centroid_drift() == pytest.approx(1 - 1 / math.sqrt(2))
    assert p.domain_drift() == 0.0
    p.observe(_inter(2, "a"), np.array([1.0, 0.0]), "travel")
    assert p.centroid_drift() == pytest.approx(0.0, abs=1e-12)
    assert p.domain_drift() == pytest.approx(1.0)
    assert p.drift() == pytest.approx(1.0)


def test_drift_rises_when_the_stream_changes_domain():
    rng = np.random.default_rng(0)
    centers = {d: rng.normal(size=32) for d in DOMAINS}
    p = UserProfile(DOMAINS)

    def feed(domain: str, n: int) -> None:
        for i in range(n):
            p.observe(_inter(i, "some question here"), centers[domain] + rng.normal(scale=0.5, size=32), domain)

    feed("cooking", 80)
    p.mark_adapted()
    feed("cooking", 40)
    stable = p.drift()
    feed("travel", 40)
    drifted = p.drift()
    assert stable < 0.1
    assert drifted > 0.6 and p.domain_drift() > 0.8
    p.mark_adapted()
    assert p.drift() == pytest.approx(0.0, abs=1e-9)


def test_drift_separates_drifting_from_stable_synthetic_users():
    lex = default_lexicons(0)
    pop = SyntheticPopulation(40, seed=0, stream_length=160, drift_fraction=0.5)
    rng = np.random.default_rng(1)
    vocab: dict[str, np.ndarray] = {}

    def embed(text: str) -> np.ndarray:
        return sum((vocab.setdefault(w, rng.normal(size=48)) for w in tokenize(text)), np.zeros(48))

    drifted, stable, top_is_new = [], [], []
    for dev in range(pop.num_devices):
        persona, stream = pop.persona(dev), pop.stream(dev)
        adapt_at = persona.drift_at - 1 if persona.drift_at is not None else 60
        measure_at = min(adapt_at + 41, len(stream) - 1)
        p = UserProfile(lex.domains)
        for x in stream[: measure_at + 1]:
            p.observe(x, embed(item_text(x)), lex.tag(tokenize(item_text(x))))
            if x.index == adapt_at:
                p.mark_adapted()
        if persona.drift_at is None:
            stable.append(p.drift())
        else:
            drifted.append(p.drift())
            weights = p.interest_weights()
            top_is_new.append(max(weights, key=weights.get) in persona.drift_to)
    assert len(drifted) >= 10 and len(stable) >= 10
    assert np.mean(drifted) > np.mean(stable) + 0.1, (np.mean(drifted), np.mean(stable))
    assert np.mean(top_is_new) >= 0.7  # the interest weights follow the new interests


def test_should_adapt_logic():
    p = UserProfile(DOMAINS, ema=1.0)
    p.observe(_inter(0, "a"), np.array([1.0, 0.0]), "cooking")
    assert p.should_adapt(new_items=4, min_new_items=4, drift_trigger=0.35)
    assert not p.should_adapt(new_items=3, min_new_items=4, drift_trigger=0.35)  # no drift yet
    p.mark_adapted()
    p.observe(_inter(1, "a"), np.array([0.0, 1.0]), "travel")  # drift 1.0
    assert p.should_adapt(new_items=1, min_new_items=4, drift_trigger=0.35)
    assert not p.should_adapt(new_items=0, min_new_items=4, drift_trigger=0.35)  # nothing new to learn
    assert not p.should_adapt(new_items=1, min_new_items=4, drift_trigger=1.5)
    assert p.should_adapt(new_items=0, min_new_items=0, drift_trigger=1.5)  # trigger disabled: always


def test_state_round_trip_is_json_and_continues_identically():
    rng = np.random.default_rng(2)
    p = UserProfile(DOMAINS, ema=0.1)
    for i in range(30):
        p.observe(_inter(i, "word " * (i % 7 + 1)), rng.normal(size=8), DOMAINS[i % 3] if i % 4 else "general")
    p.record_feedback("edit")
    p.mark_adapted()
    p.observe(_inter(30, "more words here"), rng.normal(size=8), "travel")
    q = UserProfile.from_state(json.loads(json.dumps(p.to_state())))
    assert q.to_state() == p.to_state()
    assert q.drift() == p.drift() > 0
    x, e = _inter(31, "again"), rng.normal(size=8)
    p.observe(x, e, "cooking")
    q.observe(x, e, "cooking")
    assert q.to_state() == p.to_state()
    with pytest.raises(ValueError, match="corrupt profile state"):
        UserProfile.from_state({"domains": ["a"]})
