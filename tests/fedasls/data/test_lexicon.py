"""Domain lexicons: the tag and DSS metrics against hand-computed values, derivation, files."""

from __future__ import annotations


import pytest

from fedasls.data.lexicon import GENERAL, DomainLexicons, LexiconError, default_lexicons, tokenize
from fedasls.data.population import DOMAINS, SyntheticPopulation, public_corpus


@pytest.fixture()
def tiny() -> DomainLexicons:
    return DomainLexicons({"food": ["pasta", "oven", "salt"], "sport": ["run", "gym", "salt"]})


def test_tokenize_lowercases_words():
    assert tokenize("Hi, I'm at the GYM: run 5k!") == ["hi", "i'm", "at", "the", "gym", "run", "5k"]
    assert tokenize("") == []


def test_tag_and_dss_match_hand_computed_values(tiny):
    tokens = tokenize("I put salt on pasta before the gym run")  # n = 9
    # |T ∩ food| = |{salt, pasta}| = 2, |T ∩ sport| = |{salt, gym, run}| = 3
    assert tiny.overlaps(tokens) == [2, 3]
    assert tiny.tag(tokens) == "sport"
    assert tiny.dss(tokens) == pytest.approx((2 / 9 + 3 / 9) / 2)
    # Tie 1-1 goes to the first domain; n = 1.
    assert tiny.tag(["salt"]) == "food"
    assert tiny.dss(["salt"]) == pytest.approx((1 / 1 + 1 / 1) / 2)
    # T is a set, n counts every token: "pasta pasta pasta" -> (1/3 + 0) / 2.
    assert tiny.dss(["pasta", "pasta", "pasta"]) == pytest.approx(1 / 6)
    assert tiny.tag(["pasta", "pasta", "pasta"]) == "food"
    # No overlap -> "general" and 0; empty text -> 0.
    assert tiny.tag(["hello", "there"]) == GENERAL
    assert tiny.dss(["hello", "there"]) == 0.0
    assert tiny.dss([]) == 0.0 and tiny.tag([]) == GENERAL
    # Raw strings are tokenized the same way.
    assert tiny.dss("Pasta in the OVEN") == pytest.approx((2 / 4 + 0) / 2)


def test_from_labelled_picks_distinctive_words_and_skips_chatter():
    texts = [
        ("food", "pasta oven the pasta fresh"),
        ("food", "oven salt pasta fresh"),
        ("sport", "gym run salt fresh"),
        ("sport", "gym run the fresh"),
        ("chatter", "hi thanks hi thanks"),
    ]
    lex = DomainLexicons.from_labelled(texts)
    assert lex.domains == ("food", "sport")  # chatter is never a domain
    # "fresh" is as common in both (ratio ~1), "salt" too rare, "the" a stopword.
    assert lex.words == {"food": frozenset({"pasta", "oven"}), "sport": frozenset({"gym", "run"})}
    assert DomainLexicons.from_labelled(texts, top_k=1).words["food"] == frozenset({"pasta"})
    assert DomainLexicons.from_labelled(texts, domains=["sport", "food"]).domains == ("sport", "food")
    with pytest.raises(LexiconError, match="no labelled texts"):
        DomainLexicons.from_labelled(texts, domains=["food", "music"])
    with pytest.raises(LexiconError, match="reserved"):
        DomainLexicons({"chatter": ["hi"]})


def test_public_corpus_lexicons_tag_heldout_texts_accurately():
    lex = default_lexicons(0)
    assert lex is default_lexicons(0)  # cached in-process
    assert lex.domains == DOMAINS and "chatter" not in lex.domains
    assert all(10 <= len(lex.words[d]) <= 60 for d in DOMAINS)
    # Held out: another seed's public texts and real stream questions.
    held = [(d, t) for d, t in public_corpus(123, 400) if d != "chatter"]
    acc = sum(lex.tag(t) == d for d, t in held) / len(held)
    assert acc > 0.9
    pop = SyntheticPopulation(50, seed=11)
    qs = [x for i in range(20) for x in pop.stream(i) if x.kind == "valuable"]
    q_acc = sum(lex.tag(x.question) == x.domain for x in qs) / len(qs)
    assert q_acc > 0.7
    chatter = [x for i in range(20) for x in pop.stream(i) if x.kind == "chatter"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean([lex.dss(x.question + " " + x.response) for x in chatter]) < 0.5 * mean(
        [lex.dss(x.question + " " + x.response) for x in qs])


def test_save_load_roundtrip(tmp_path, tiny):
    path = tiny.save(tmp_path / "sub" / "lex.json")
    loaded = DomainLexicons.load(path)
    assert loaded == tiny and loaded.domains == ("food", "sport")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"food": ["pasta",}', r"bad\.json:1:\d+: not valid JSON"),
        ('["pasta", "oven"]', "top level must be an object"),
        ('{"food": "pasta"}', "domain 'food' must map to a list"),
        ('{"food": ["pasta", 3]}', "domain 'food' must map to a list"),
        ('{"chatter": ["hi"]}', "'chatter' is reserved"),
        ("{}", "at least one domain"),
    ],
)
def test_load_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LexiconError, match=message):
        DomainLexicons.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(LexiconError, match="not found"):
        DomainLexicons.load(tmp_path / "nope.json")
