"""JSONL loaders: Alpaca and Dolly shapes, partitioners, JsonlPopulation, bad-input errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedasls.config import PopulationSettings
from fedasls.data.loaders import (
    DatasetError,
    JsonlPopulation,
    load_jsonl,
    partition_by_user,
    partition_dirichlet,
    partition_iid,
    records_lexicons,
)
from fedasls.data.population import Population
from fedasls.data.sources import population_from_settings

CATEGORIES = ("open_qa", "brainstorming", "summarization", "classification")


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def alpaca(tmp_path) -> Path:
    rows = [{"instruction": f"Give tip {k} about sourdough bread", "input": "" if k % 2 else f"context {k}",
             "output": f"Preheat the oven and rest the dough, tip {k}.", "user_id": f"u{k % 3}"} for k in range(12)]
    return _write(tmp_path / "alpaca.jsonl", rows)


@pytest.fixture()
def dolly(tmp_path) -> Path:
    rows = [{"instruction": f"Question number {k}?", "context": "Some context." if k % 3 == 0 else "",
             "response": f"Answer number {k}.", "category": CATEGORIES[k % 4], "user_id": k % 5}
            for k in range(40)]
    return _write(tmp_path / "dolly.jsonl", rows)


def _covers(parts: list[list[int]], n: int) -> bool:
    flat = sorted(k for p in parts for k in p)
    return flat == list(range(n))


def test_load_alpaca_and_dolly_shapes(alpaca, dolly):
    a = load_jsonl(alpaca)
    assert len(a) == 12
    assert a[0].question == "Give tip 0 about sourdough bread\ncontext 0" and a[1].question == "Give tip 1 about sourdough bread"
    assert a[4].output == "Preheat the oven and rest the dough, tip 4." and a[4].user_id == "u1"
    assert a[0].category is None and a[0].line == 1
    d = load_jsonl(dolly)
    assert len(d) == 40 and d[3].input == "Some context." and d[3].output == "Answer number 3."
    assert d[5].category == CATEGORIES[1] and d[7].user_id == "2"  # int ids become strings


def test_partition_counts(dolly):
    records = load_jsonl(dolly)
    by_user = partition_by_user(records)
    assert len(by_user) == 5 and [len(p) for p in by_user] == [8] * 5 and _covers(by_user, 40)
    assert all(records[k].user_id == records[p[0]].user_id for p in by_user for k in p)
    iid = partition_iid(40, 6, seed=1)
    assert _covers(iid, 40) and sorted(len(p) for p in iid) == [6, 6, 7, 7, 7, 7]
    assert iid == partition_iid(40, 6, seed=1) and iid != partition_iid(40, 6, seed=2)
    labels = [r.category for r in records]
    dirichlet = partition_dirichlet(labels, 6, alpha=0.5, seed=0)
    assert len(dirichlet) == 6 and _covers(dirichlet, 40) and all(dirichlet)
    assert dirichlet == partition_dirichlet(labels, 6, alpha=0.5, seed=0)


def test_dirichlet_skew_follows_alpha():
    rng = np.random.default_rng(0)
    labels = [str(x) for x in rng.integers(0, 10, size=2000)]

    def mean_labels_per_device(alpha: float) -> float:
        parts = partition_dirichlet(labels, 20, alpha=alpha, seed=3)
        assert _covers(parts, len(labels)) and all(parts)
        # labels that make up >= 5% of a device's data
        return float(np.mean([sum(c >= 0.05 * len(p) for c in Counter(labels[k] for k in p).values())
                              for p in parts]))

    skewed, balanced = mean_labels_per_device(0.05), mean_labels_per_device(100.0)
    assert skewed < 3 and balanced >= 9


def test_partition_errors(dolly, tmp_path):
    with pytest.raises(DatasetError, match=r"num_devices \(41\) exceeds the number of records \(40\)"):
        partition_iid(40, 41)
    with pytest.raises(DatasetError, match="exceeds"):
        partition_dirichlet(["a"] * 3, 4, alpha=1.0)
    path = _write(tmp_path / "nouser.jsonl", [{"instruction": "a", "output": "b", "user_id": "x"},
                                              {"instruction": "c", "output": "d"}])
    with pytest.raises(DatasetError, match=r"nouser\.jsonl:2: missing field 'user_id'.*partition='iid'"):
        partition_by_user(load_jsonl(path))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"input": "x", "output": "y"}, r"bad\.jsonl:3: missing field 'instruction' \(expected keys: instruction"),
        ({"instruction": "x"}, r"bad\.jsonl:3: missing field 'output\|response'"),
        ('{"instruction": "x", "output": ', r"bad\.jsonl:3: invalid JSON"),
        ({"instruction": 5, "output": "y"}, r"bad\.jsonl:3: field 'instruction' must be a string, got a number"),
        ({"instruction": "x", "response": ["y"]}, r"bad\.jsonl:3: field 'response' must be a string, got a JSON array of 1"),
        ({"instruction": "x", "output": "y", "category": 1}, r"bad\.jsonl:3: field 'category' must be a string"),
        ({"instruction": "x", "output": "y", "user_id": [1]}, r"bad\.jsonl:3: field 'user_id' must be a string or integer"),
        ({"instruction": "  ", "output": "y"}, r"bad\.jsonl:3: field 'instruction' is empty"),
        ('["instruction", "output"]', r"bad\.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    good = {"instruction": "fine", "output": "ok"}
    path = _write(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(DatasetError, match=message):
        load_jsonl(path)


@pytest.mark.parametrize("field", ["instruction", "user_id", "category", "output"])
@pytest.mark.parametrize("value", [["My bank PIN is 4321"], {"note": "My bank PIN is 4321"}, ["x" * 5_000_000]])
def test_errors_name_the_field_and_its_type_never_its_value(tmp_path, field, value):
    record = {"instruction": "fine", "output": "ok", field: value}
    path = _write(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DatasetError) as err:
        load_jsonl(path)
    text = str(err.value)
    assert f"field '{field}'" in text and "bad.jsonl:1" in text
    assert "4321" not in text and "xxxx" not in text and len(text) < 300


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no records"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_jsonl_population_streams(dolly, alpaca):
    pop = JsonlPopulation(dolly, partition="user", heldout=2, seed=4)
    assert isinstance(pop, Population) and pop.num_devices == 5
    records = load_jsonl(dolly)
    for i in range(pop.num_devices):
        stream, held = pop.stream(i), pop.heldout(i)
        assert len(stream) == 6 and len(held) == 2
        both = stream + held
        assert all(b.timestamp > a.timestamp for a, b in zip(both, both[1:]))
        assert all(x.kind == "data" and x.device_id == i for x in both)
        owned = [r for r in records if r.user_id == records[pop.parts[i][0]].user_id]
        assert [x.preferred for x in both] == [r.output for r in owned]
        assert [x.question for x in both] == [r.question for r in owned]
        assert [x.domain for x in both] == [r.category for r in owned]
        assert all(x.response != x.preferred for x in both)
        persona = pop.persona(i)
        assert set(persona.interests) <= set(CATEGORIES) and persona.style["length"] == "short"
    assert pop.stream(2) == JsonlPopulation(dolly, partition="user", heldout=2, seed=4).stream(2)
    assert JsonlPopulation(dolly, partition="user", num_devices=3).num_devices == 3
    # Categorised data brings its own lexicons, built from its categories.
    assert set(pop.lexicons.domains) == set(CATEGORIES)
    # No category: domain comes from the default lexicon tag (the Alpaca rows are about baking).
    tagged = JsonlPopulation(alpaca, partition="iid", num_devices=3, heldout=1)
    assert {x.domain for i in range(3) for x in tagged.stream(i)} == {"cooking"}
    assert tagged.persona(0).interests == ("cooking",)
    # A device never loses more than half its records to the held-out split.
    small = JsonlPopulation(alpaca, partition="iid", num_devices=6, heldout=8)
    assert all(len(small.stream(i)) == 1 and len(small.heldout(i)) == 1 for i in range(6))
    with pytest.raises(IndexError):
        small.stream(6)


def test_population_from_settings_builds_jsonl(dolly):
    settings = PopulationSettings(source="jsonl", jsonl_path=str(dolly), partition="dirichlet", num_devices=4,
                                  dirichlet_alpha=0.3, heldout=1, seed=2)
    pop = population_from_settings(settings)
    assert isinstance(pop, JsonlPopulation) and pop.num_devices == 4
    assert sum(len(pop.stream(i)) + len(pop.heldout(i)) for i in range(4)) == 40


def test_records_lexicons_learn_the_files_categories(tmp_path):
    space = ["telescope", "orbit", "planet", "galaxy", "comet"]
    bake = ["flour", "dough", "oven", "yeast", "crust"]
    rows = []
    for k in range(30):
        words, cat = (space, "astronomy") if k % 2 else (bake, "baking")
        rows.append({"instruction": f"Tell me about {words[k % 5]} and {words[(k + 1) % 5]}",
                     "output": f"The {words[(k + 2) % 5]} matters.", "category": cat})
    lex = records_lexicons(load_jsonl(_write(tmp_path / "cats.jsonl", rows)))
    assert lex.domains == ("baking", "astronomy")
    assert lex.words["astronomy"] == frozenset(space) and lex.words["baking"] == frozenset(bake)
    assert lex.tag(lex.tokenize("is the comet near a planet")) == "astronomy"
