"""Selection: metrics against hand-computed values, the byte budget, every policy's behaviour."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedasls.lm.embedding import LMEmbedder, MiniLMEmbedder, make_embedder
from fedasls.lm.prompts import PromptFormat
from fedasls.interaction import Interaction
from fedasls.data.lexicon import DomainLexicons, default_lexicons, tokenize
from fedasls.data.population import SyntheticPopulation
from fedasls.pipeline.profile import UserProfile
from fedasls.pipeline.selection import (
    POLICY_NAMES,
    Buffer,
    BufferItem,
    Selector,
    eoe,
    histogram_entropy,
    idd,
    item_text,
    make_policy,
)

TINY_LEX = DomainLexicons({"cooking": ["oven", "bake", "dough"], "fitness": ["run", "gym", "squat"]})


def _inter(i: int, question: str = "q", response: str = "r") -> Interaction:
    return Interaction(0, i, float(i), question, response, "pref", "cooking")


def _item(i: int, emb, domain: str = "cooking", q: str = "q", eoe_: float = 1.0, dss: float = 1.0) -> BufferItem:
    return BufferItem(_inter(i, q), np.asarray(emb, dtype=np.float32), domain, eoe_, dss, seq=i)


# ----------------------------------------------------------------------------- metrics


def test_histogram_entropy_matches_hand_computation():
    # 100 bins over [0, 1]: three values in the first bin, one in the last -> p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert histogram_entropy(np.array([0.0, 0.0, 0.0, 1.0])) == pytest.approx(h)
    # four values in four different bins -> ln 4
    assert histogram_entropy(np.array([0.0, 1.0, 2.0, 3.0])) == pytest.approx(math.log(4))
    assert histogram_entropy(np.full(16, 0.3)) == 0.0
    # EOE = entropy / log2(n_tokens + 1): n = 3 -> log2(4) = 2; n = 7 -> 3
    assert eoe(np.array([0.0, 0.0, 0.0, 1.0]), 3) == pytest.approx(h / 2)
    assert eoe(np.array([0.0, 1.0, 2.0, 3.0]), 7) == pytest.approx(math.log(4) / 3)
    with pytest.raises(ValueError, match="NaN"):
        histogram_entropy(np.array([0.0, np.nan]))


def test_dss_tag_and_eoe_token_count_of_a_scored_item():
    sel = Selector(TINY_LEX, make_policy("fifo"), 10_000)
    # item text "bake the dough then run\nok": 6 tokens; cooking overlap 2, fitness 1
    item = sel.score(_inter(0, "bake the dough then run", "ok"), np.array([0.0, 1.0, 2.0, 3.0]))
    assert item.domain == "cooking"
    assert item.dss == pytest.approx(0.5 * (2 / 6 + 1 / 6))
    assert item.eoe == pytest.approx(math.log(4) / math.log2(7))
    assert item.idd == 1.0  # empty domain
    assert item.nbytes == len("bake the dough then run" + "ok") + 4 * 4


def test_idd_with_known_vectors_and_leave_one_out_in_buffer():
    assert idd(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5)
    assert idd(np.array([1.0, 0.0]), np.array([[-2.0, 0.0]])) == pytest.approx(2.0)
    assert idd(np.array([1.0, 0.0]), np.zeros((0, 2))) == 1.0

    buf = Buffer(10_000)
    a, b, c = _item(0, [1, 0]), _item(1, [0, 1]), _item(2, [1, 1])
    other = _item(3, [-1, 0], domain="fitness")
    for it in (a, b, c, other):
        buf.add(it)
    s = 1 / math.sqrt(2)
    assert a.idd == pytest.approx(1 - (0 + s) / 2)
    assert b.idd == pytest.approx(1 - (0 + s) / 2)
    assert c.idd == pytest.approx(1 - s)
    assert other.idd == 1.0  # alone in its domain; other domains do not count
    assert buf.candidate_idd(_item(4, [1, 0])) == pytest.approx(1 - (1 + 0 + s) / 3)
    buf.remove(b)
    assert a.idd == pytest.approx(1 - s) and c.idd == pytest.approx(1 - s)
    buf.remove(c)
    assert a.idd == 1.0


# ----------------------------------------------------------------------------- budget


def _random_stream(n: int, seed: int, dim: int = 24) -> list[tuple[Interaction, np.ndarray]]:
    rng = np.random.default_rng(seed)
    words = sorted(w for d in TINY_LEX.domains for w in TINY_LEX.words[d]) + ["hi", "ok", "the", "please"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(1, 40))))
        if i % 97 == 0:
            q = "x" * 3000  # larger than the whole budget: must be rejected
        out.append((_inter(i, q, "fine"), rng.normal(size=dim).astype(np.float32)))
    return out


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_byte_budget_never_exceeded_for_any_policy(policy):
    budget = 2_000
    profile = UserProfile(TINY_LEX.domains)
    sel = Selector(TINY_LEX, make_policy(policy, TINY_LEX, seed=3, profile=profile), budget)
    admitted = 0
    for inter, emb in _random_stream(600, seed=11):
        profile.observe(inter, emb, TINY_LEX.tag(tokenize(inter.question)))
        admitted += sel.observe(inter, emb)
        items = sel.buffer.items()
        assert sel.buffer.used_bytes == sum(it.nbytes for it in items) <= budget
        assert all(len(it.interaction.question) < 3000 for it in items)
    assert admitted >= 10 and len(sel.buffer) >= 3


def test_bad_names_are_rejected_clearly():
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("lru", TINY_LEX)
    with pytest.raises(ValueError, match="buffer_bytes"):
        Buffer(0)


# ----------------------------------------------------------------------------- baselines


def test_fifo_evicts_the_oldest():
    sel = Selector(TINY_LEX, make_policy("fifo"), 5 * (1 + 1 + 8))  # five items of 10 bytes
    rng = np.random.default_rng(0)
    for i in range(23):
        assert sel.observe(_inter(i, "a", "b"), rng.normal(size=2))
        assert [it.interaction.index for it in sel.buffer.items()] == list(range(max(0, i - 4), i + 1))


def test_reservoir_inclusion_is_uniform_over_the_stream():
    n, k, runs = 40, 8, 400
    hits = np.zeros(n)
    stream = [(_inter(i, "a", "b"), np.array([1.0, float(i)], dtype=np.float32)) for i in range(n)]
    for seed in range(runs):
        sel = Selector(TINY_LEX, make_policy("reservoir", seed=seed), k * 10)
        for inter, emb in stream:
            sel.observe(inter, emb)
        assert len(sel.buffer) == k
        for it in sel.buffer.items():
            hits[it.interaction.index] += 1
    p = hits / runs  # each should be k / n = 0.2 (sd 0.02 per position)
    assert np.all(np.abs(p - k / n) < 0.08), p
    assert abs(p[: n // 2].mean() - p[n // 2 :].mean()) < 0.04


def test_random_policy_is_deterministic_per_seed():
    stream = _random_stream(300, seed=5)

    def kept(seed: int) -> list[int]:
        sel = Selector(TINY_LEX, make_policy("random", seed=seed), 1_500)
        for inter, emb in stream:
            sel.observe(inter, emb)
        return [it.seq for it in sel.buffer.items()]

    assert kept(1) == kept(1)
    assert any(kept(1) != kept(s) for s in (2, 3, 4))


def test_kcenter_covers_every_cluster():
    rng = np.random.default_rng(0)
    centers = np.eye(16, dtype=np.float32)[:5] * 10
    labels = [0, 1, 2, 3, 4] + [0] * 60 + [1] * 5 + [0] * 60  # ends in a long run of cluster 0
    k_items = 6
    per_item = 2 + 16 * 4
    sel = Selector(TINY_LEX, make_policy("kcenter"), k_items * per_item)
    fifo = Selector(TINY_LEX, make_policy("fifo"), k_items * per_item)
    for i, c in enumerate(labels):
        emb = centers[c] + rng.normal(scale=0.3, size=16).astype(np.float32)
        sel.observe(_inter(i, "a", "b"), emb)
        fifo.observe(_inter(i, "a", "b"), emb)

    def clusters(s: Selector) -> set[int]:
        return {labels[it.seq] for it in s.buffer.items()}

    assert clusters(sel) == {0, 1, 2, 3, 4}
    assert clusters(fifo) == {0}  # the stream would defeat a recency rule


def test_score_policy_evicts_lowest_and_rejects_worse():
    buf = Buffer(3 * (2 + 8))
    pol = make_policy("dss")
    for i, d in enumerate([0.3, 0.1, 0.2]):
        assert pol.offer(buf, _item(i, [1, i], dss=d, q="a", eoe_=1))
    assert not pol.offer(buf, _item(3, [1, 3], dss=0.05, q="a"))  # worse than everyone
    assert pol.offer(buf, _item(4, [1, 4], dss=0.15, q="a"))  # evicts the 0.1 item
    assert sorted(it.dss for it in buf.items()) == [0.15, 0.2, 0.3]


# ----------------------------------------------------------------------------- full policy


def _bow_embedder(dim: int = 96, seed: int = 0):
    """Random projection of bag-of-words: a cheap stand-in for a sentence embedding."""
    proj: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)

    def embed(text: str) -> np.ndarray:
        v = np.zeros(dim, dtype=np.float32)
        for w in tokenize(text):
            if w not in proj:
                proj[w] = rng.normal(size=dim).astype(np.float32)
            v += proj[w]
        return v

    return embed


def test_full_policy_buffers_more_valuable_items_than_baselines():
    lex = default_lexicons(0)
    pop = SyntheticPopulation(8, seed=3, stream_length=160)
    embed = _bow_embedder()
    share: dict[str, list[float]] = {}
    for dev in range(pop.num_devices):
        stream = pop.stream(dev)
        embs = [embed(item_text(x)) for x in stream]
        for name in ("full", "full-noprofile", "fifo", "random", "dss", "eoe", "idd"):
            profile = UserProfile(lex.domains)
            use_profile = name == "full"
            sel = Selector(lex, make_policy(name.split("-")[0], lex, seed=dev, profile=profile if use_profile else None),
                           16_384)
            for x, e in zip(stream, embs):
                profile.observe(x, e, lex.tag(tokenize(item_text(x))))
                sel.observe(x, e)
            kinds = [it.interaction.kind for it in sel.buffer.items()]
            share.setdefault(name, []).append(kinds.count("valuable") / len(kinds))
    mean = {k: float(np.mean(v)) for k, v in share.items()}
    assert mean["full"] > 1.5 * max(mean["fifo"], mean["random"]), mean
    assert mean["full"] > max(mean["dss"], mean["eoe"], mean["idd"]), mean
    assert mean["full-noprofile"] > max(mean["fifo"], mean["random"], mean["dss"], mean["eoe"], mean["idd"]), mean


def test_full_policy_rejects_chatter_and_exact_duplicates_when_full():
    lex = TINY_LEX
    sel = Selector(lex, make_policy("full", lex), 2 * (len("bake dough oven gym") + 3 * 4 + 2))
    assert sel.observe(_inter(0, "bake dough oven gym", "ok"), np.array([1, 0, 0.5], np.float32))
    assert sel.observe(_inter(1, "run squat gym oven", "ok"), np.array([0, 1, 0.2], np.float32))
    assert not sel.observe(_inter(2, "hello how are", "ok"), np.array([0.3, 0.3, 0.1], np.float32))  # DSS 0
    assert not sel.observe(_inter(3, "bake dough oven gym", "ok"), np.array([1, 0, 0.5], np.float32))  # copy
    assert [it.seq for it in sel.buffer.items()] == [0, 1]


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("policy", ["full", "random", "reservoir", "kcenter"])
def test_state_round_trip_continues_identically(policy):
    stream = _random_stream(240, seed=7)
    sel = Selector(TINY_LEX, make_policy(policy, TINY_LEX, seed=9), 1_800)
    for inter, emb in stream[:120]:
        sel.observe(inter, emb)
    sel.mark_adapted()
    for inter, emb in stream[120:150]:
        sel.observe(inter, emb)
    state = json.loads(json.dumps(sel.to_state()))
    copy = Selector.from_state(state, TINY_LEX, seed=9)
    assert [it.to_state() for it in copy.buffer.items()] == [it.to_state() for it in sel.buffer.items()]
    assert copy.changes_since_adaptation == sel.changes_since_adaptation
    assert [it.seq for it in copy.new_items()] == [it.seq for it in sel.new_items()]
    for a, b in zip(copy.buffer.items(), sel.buffer.items()):
        assert a.idd == pytest.approx(b.idd) and a.embedding.dtype == np.float32
    for inter, emb in stream[150:]:
        assert copy.observe(inter, emb) == sel.observe(inter, emb)
    assert [it.seq for it in copy.buffer.items()] == [it.seq for it in sel.buffer.items()]


def test_corrupt_state_is_reported():
    with pytest.raises(ValueError, match="corrupt selector state"):
        Selector.from_state({"policy": "fifo"}, TINY_LEX)


def test_change_counter_counts_admissions_since_adaptation():
    sel = Selector(TINY_LEX, make_policy("fifo"), 3 * 10)
    for i in range(5):
        sel.observe(_inter(i, "a", "b"), np.ones(2))
    assert sel.changes_since_adaptation == 5
    sel.mark_adapted()
    assert sel.changes_since_adaptation == 0 and sel.new_items() == []
    sel.observe(_inter(5, "a", "b"), np.ones(2))
    assert sel.changes_since_adaptation == 1 and [it.seq for it in sel.new_items()] == [5]


# ----------------------------------------------------------------------------- embedders


def test_lm_embedder_shape(tiny_lm):
    model, tokenizer = tiny_lm
    emb = make_embedder("lm", model, PromptFormat(tokenizer), batch_size=2)
    assert isinstance(emb, LMEmbedder)
    out = emb.embed(["how do I bake bread", "hi", "what is a good gym plan for beginners"])
    assert out.shape == (3, model.config.hidden_size) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and not np.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="model and its PromptFormat"):
        make_embedder("lm")


def test_minilm_embedder_is_semantic_and_unit_norm():
    emb = make_embedder("minilm", batch_size=2)
    assert isinstance(emb, MiniLMEmbedder)
    out = emb.embed(["How long should I bake sourdough bread?", "What oven temperature for baking bread?",
                     "How do I fix a merge conflict in git?"])
    assert out.shape == (3, 384) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert out[0] @ out[1] > out[0] @ out[2] + 0.2
    with pytest.raises(ValueError, match="choose one of"):
        make_embedder("bert")
