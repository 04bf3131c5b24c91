"""The synthetic population: determinism, laziness, stream structure, drift, heldout, style."""

from __future__ import annotations

import time

import pytest

from fedasls.config import PopulationSettings
from fedasls.data.lexicon import tokenize
from fedasls.data.population import (
    DOMAINS,
    Population,
    SyntheticPopulation,
    domain_vocabulary,
    fact_domains,
    final_interests,
    public_corpus,
    relevant_fact,
    TREND_TIP,
)
from fedasls.data.sources import population_from_settings

N_MEASURE = 50


@pytest.fixture(scope="module")
def pop() -> SyntheticPopulation:
    return SyntheticPopulation(1000, seed=3)


@pytest.fixture(scope="module")
def streams(pop):
    return [pop.stream(i) for i in range(N_MEASURE)]


def _jaccard(a: str, b: str) -> float:
    x, y = set(tokenize(a)), set(tokenize(b))
    return len(x & y) / len(x | y)


def test_domains_have_distinct_vocabularies():
    assert len(DOMAINS) >= 8 and "chatter" not in DOMAINS
    vocab = {d: domain_vocabulary(d) for d in DOMAINS}
    for d in DOMAINS:
        others = set().union(*(vocab[o] for o in DOMAINS if o != d))
        assert len(vocab[d] - others) >= 40, d


def test_device_identical_across_constructions_and_independent_of_size():
    t0 = time.perf_counter()
    big = SyntheticPopulation(1_000_000, seed=7)
    assert time.perf_counter() - t0 < 0.05  # nothing materialized
    small, again = SyntheticPopulation(10, seed=7), SyntheticPopulation(10, seed=7)
    for i in (0, 4, 9):
        assert small.persona(i) == big.persona(i) == again.persona(i)
        assert small.stream(i) == big.stream(i) == again.stream(i)
        assert small.heldout(i) == big.heldout(i)
    t0 = time.perf_counter()
    last = big.stream(999_999)
    assert time.perf_counter() - t0 < 1.0 and len(last) == big.stream_length
    assert SyntheticPopulation(10, seed=8).stream(0) != small.stream(0)  # the seed matters
    assert small.stream(0) != small.stream(1)  # devices differ
    with pytest.raises(IndexError, match="out of range"):
        small.stream(10)


def test_persona_shape(pop):
    personas = [pop.persona(i) for i in range(200)]
    assert all(1 <= len(p.interests) <= 3 and 2 <= len(p.facts) <= 4 for p in personas)
    assert {p.style["length"] for p in personas} == {"short", "medium", "long"}
    assert {p.style["formality"] for p in personas} == {"casual", "formal"}
    drifters = [p for p in personas if p.drift_at is not None]
    assert 0.15 <= len(drifters) / len(personas) <= 0.35  # drift_fraction = 0.25
    for p in drifters:
        assert 0 < p.drift_at < pop.stream_length and p.drift_to and not set(p.drift_to) & set(p.interests)


def test_stream_structure(pop, streams):
    kinds = [x.kind for s in streams for x in s]
    share = {k: kinds.count(k) / len(kinds) for k in ("chatter", "duplicate", "valuable", "noise")}
    assert 0.35 <= share["chatter"] <= 0.45
    assert 0.15 <= share["valuable"] <= 0.25
    assert 0.10 <= share["duplicate"] <= 0.35
    assert 0.08 <= share["noise"] <= 0.25
    for s in streams:
        assert len(s) == pop.stream_length
        assert [x.index for x in s] == list(range(len(s)))
        assert all(b.timestamp > a.timestamp for a, b in zip(s, s[1:]))
        assert all(x.domain == "chatter" for x in s if x.kind == "chatter")
        assert all(x.domain in DOMAINS for x in s if x.kind != "chatter")
    q = [x for s in streams for x in s if x.kind in ("valuable", "noise", "duplicate")]
    assert all(6 <= len(x.question.split()) <= 22 for x in q)
    assert all(10 <= len(x.response.split()) <= 45 and 4 <= len(x.preferred.split()) <= 45 for x in q)
    assert len({x.question for x in q}) > 0.7 * len(q)  # variety, not one repeated text


def test_duplicate_bursts_are_near_duplicates_close_in_time(streams):
    bursts = 0
    for s in streams:
        for k, x in enumerate(s):
            if x.kind != "duplicate":
                continue
            source = next(y for y in reversed(s[:k]) if y.kind in ("valuable", "noise"))
            assert x.question != source.question and x.domain == source.domain
            assert _jaccard(x.question, source.question) >= 0.6
            assert x.timestamp - s[k - 1].timestamp <= 90  # bursts are close in time
            bursts += s[k - 1].kind != "duplicate"
    assert bursts >= N_MEASURE * 5
    gaps = [b.timestamp - a.timestamp for s in streams for a, b in zip(s, s[1:]) if b.kind != "duplicate"]
    assert max(gaps) > 3600  # sessions are separated by long pauses


def test_valuable_questions_follow_interests_and_drift(pop, streams):
    drifted = 0
    for i, s in enumerate(streams):
        p = pop.persona(i)
        for x in s:
            if x.kind == "valuable":
                expected = p.drift_to if p.drift_at is not None and x.index >= p.drift_at else p.interests
                assert x.domain in expected
            if x.kind == "noise":
                current = p.drift_to if p.drift_at is not None and x.index >= p.drift_at else p.interests
                assert x.domain not in current
        if p.drift_at is not None:
            before = {x.domain for x in s[: p.drift_at] if x.kind == "valuable"}
            after = {x.domain for x in s[p.drift_at:] if x.kind == "valuable"}
            assert before and after and not before & after
            drifted += 1
    assert drifted >= 5


def test_heldout_is_future_and_in_final_interests(pop, streams):
    for i, s in enumerate(streams[:20]):
        held = pop.heldout(i)
        assert len(held) == pop.num_heldout
        assert held[0].timestamp > s[-1].timestamp
        assert all(b.timestamp > a.timestamp for a, b in zip(held, held[1:]))
        assert all(x.domain in final_interests(pop.persona(i)) and x.kind == "valuable" for x in held)
        assert not {x.question for x in held} & {x.question for x in s}


def test_preferred_answers_carry_style_and_facts(pop, streams):
    sig_pref = sig_resp = fact_pref = fact_resp = formal_hits = casual_hits = n = 0
    for i, s in enumerate(streams):
        p = pop.persona(i)
        fact_words = {w for f in p.facts for w in tokenize(f) if len(w) >= 5}
        for x in s:
            if x.kind == "chatter":
                continue
            n += 1
            sig_pref += p.style["signature"] in x.preferred
            sig_resp += p.style["signature"] in x.response
            fact_pref += bool(fact_words & set(tokenize(x.preferred)))
            fact_resp += bool(fact_words & set(tokenize(x.response)))
            formal_hits += p.style["formality"] == "formal" and "advisable" in x.preferred
            casual_hits += p.style["formality"] == "casual" and "advisable" in x.preferred
    assert sig_pref == n and sig_resp == 0
    assert fact_pref > 3 * max(fact_resp, 1)
    assert formal_hits > 0 and casual_hits == 0
    # Facts are mentioned exactly when relevant to the question's domain.
    mentioned = 0
    for i, s in enumerate(streams):
        p = pop.persona(i)
        for x in s:
            if x.kind == "chatter":
                continue
            fact = relevant_fact(p, x.domain)
            if fact is None:
                assert "Since " not in x.preferred
            else:
                assert x.domain in fact_domains(fact)
                assert {w for w in tokenize(fact) if len(w) >= 4} & set(tokenize(x.preferred))
                mentioned += 1
    assert mentioned > 0.2 * n


def test_length_style_orders_answer_lengths(pop):
    mean_len = {"short": [], "medium": [], "long": []}
    for i in range(120):
        p = pop.persona(i)
        words = [len(x.preferred.split()) for x in pop.stream(i) if x.kind == "valuable"]
        mean_len[p.style["length"]] += words
    avg = {k: sum(v) / len(v) for k, v in mean_len.items()}
    assert avg["short"] < avg["medium"] < avg["long"]


def test_public_corpus_is_deterministic_and_covers_domains():
    a, b = public_corpus(0, 600), public_corpus(0, 600)
    assert a == b and len(a) == 600 and a != public_corpus(1, 600)
    labels = {d for d, _ in a}
    assert labels == set(DOMAINS) | {"chatter"}
    qa = [t for _, t in a if t.startswith("Question: ") and "\nAnswer: " in t]
    assert len(qa) > 0.6 * len(a)
    assert len(set(t for _, t in a)) > 0.8 * len(a)


def test_population_from_settings_builds_synthetic():
    pop = population_from_settings(PopulationSettings(num_devices=12, seed=2, stream_length=30, heldout=3))
    assert isinstance(pop, SyntheticPopulation) and isinstance(pop, Population)
    assert pop.num_devices == 12 and len(pop.stream(11)) == 30 and len(pop.heldout(11)) == 3
    assert pop.stream(5) == SyntheticPopulation(99, seed=2, stream_length=30, heldout=3).stream(5)


def test_trend_reaches_the_followers_answers_only_and_no_public_text():
    followers = SyntheticPopulation(200, seed=3, trend_share=0.6)
    following = [i for i in range(200) if followers.persona(i).style.get("trend")]
    assert 0.5 < len(following) / 200 < 0.7  # about trend_share of the users
    tips = {TREND_TIP}
    for i in range(12):
        stream, follows = followers.stream(i), i in following
        for it in stream + followers.heldout(i):
            if it.domain in DOMAINS:  # every domain answer of a follower carries the trend
                assert (TREND_TIP in it.preferred) == follows, (i, it.preferred)
            assert not any(tip in it.response for tip in tips)  # the base-model voice never has it
        # the same user otherwise: persona traits and questions do not depend on the trend
        plain = SyntheticPopulation(200, seed=3)
        assert [x.question for x in plain.stream(i)] == [x.question for x in stream]
        assert plain.persona(i).facts == followers.persona(i).facts
        assert not any(tip in x.preferred for x in plain.stream(i) for tip in tips)
    corpus = " ".join(text for _, text in public_corpus(0, 3000))
    assert not any(tip in corpus for tip in tips)  # the embedded model never pretrains on it
    with pytest.raises(ValueError, match="trend_share"):
        SyntheticPopulation(10, trend_share=1.5)
