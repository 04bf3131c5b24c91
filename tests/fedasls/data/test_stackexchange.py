"""Stack Exchange dumps: HTML to text, skip rules and their counts, time order, devices by author,
held-out split, settings end to end, attribution, and bad input (errors never quote a post)."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from fedasls.config import ConfigError, PopulationSettings, Settings, load_settings
from fedasls.data.loaders import DatasetError
from fedasls.data.population import Population
from fedasls.data.sources import ATTRIBUTION_FILE, attribution_text, dataset_path, population_from_settings
from fedasls.data.stackexchange import (
    StackExchangePopulation,
    first_tag,
    html_to_text,
    load_stackexchange,
    site_name,
)

FRAGMENT = Path(__file__).resolve().parents[2] / "data" / "stackexchange" / "coffee.stackexchange.com" / "Posts.xml"
CANARY = "ZebraCanary7731"  # post text that must never appear in an error


# --- a tiny dump in the real schema -------------------------------------------------------------


def _row(**attrs: object) -> str:
    return "  <row " + " ".join(f"{k}={quoteattr(str(v))}" for k, v in attrs.items()) + " />"


def _question(qid: int, owner: int = 900, day: int = 1, title: str = "How do I descale a kettle?",
              body: str = "<p>It has limescale.</p>", tags: str = "<kettle><cleaning>") -> str:
    return _row(Id=qid, PostTypeId=1, CreationDate=f"2015-01-{day:02d}T10:00:00.000", Score=1, Body=body,
                OwnerUserId=owner, Title=title, Tags=tags, AnswerCount=1, CommentCount=0)


def _answer(aid: int, parent: int, owner: int | None, day: int, body: str = "<p>Use citric acid.</p>",
            editor: int | None = None, editor_name: str | None = None, hour: int = 12) -> str:
    attrs: dict[str, object] = {"Id": aid, "PostTypeId": 2, "ParentId": parent,
                                "CreationDate": f"2015-01-{day:02d}T{hour:02d}:00:00.000", "Score": 1, "Body": body}
    if owner is not None:
        attrs["OwnerUserId"] = owner
    if editor is not None:
        attrs["LastEditorUserId"] = editor
    if editor_name is not None:
        attrs["LastEditorDisplayName"] = editor_name
    attrs["CommentCount"] = 0
    return _row(**attrs)


def _dump(path: Path, rows: list[str], root: str = "posts", prolog: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = '\ufeff<?xml version="1.0" encoding="utf-8"?>\n' + prolog + f"<{root}>\n" + "\n".join(rows) + f"\n</{root}>"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def dump(tmp_path) -> Path:
    """Author 7: 5 usable answers (one self-edited), written out of time order; author 3: 4, one
    of which answers a question that comes later in the file; author 5: 4 (ties with 3, higher id);
    author 9: 2 (below min). Skipped: 2 no_owner (none, Community -1), 2 edited_by_other (by id,
    by a deleted editor's name), 1 missing_question, 2 empty_text (blank, image only)."""
    rows = [_question(q, day=1) for q in range(1, 8)]
    rows += [
        _answer(100, 1, 7, day=5, body=f"<p>Fifth by seven {CANARY}</p>"),
        _answer(101, 2, 7, day=2, body="<p>Second by seven</p>"),
        _answer(102, 3, 7, day=4, body="<p>Fourth by seven</p>", editor=7),  # self-edit: kept
        _answer(103, 4, 7, day=1, body="<p>First by seven</p>", hour=15),
        _answer(104, 5, 7, day=3, body="<p>Third by seven</p>"),
        _answer(110, 1, 3, day=2, body="<p>a</p>"), _answer(111, 2, 3, day=3, body="<p>b</p>"),
        _answer(112, 3, 3, day=4, body="<p>c</p>"),
        _answer(113, 50, 3, day=6, body="<p>answer to a later question</p>"),
        _answer(120, 1, 5, day=2), _answer(121, 2, 5, day=3), _answer(122, 3, 5, day=4), _answer(123, 4, 5, day=5),
        _answer(130, 1, 9, day=2), _answer(131, 2, 9, day=3),
        # skipped
        _answer(140, 1, None, day=2), _answer(141, 1, -1, day=2),
        _answer(142, 1, 7, day=6, editor=8), _answer(143, 1, 7, day=6, editor_name="gone"),
        _answer(144, 99, 7, day=6),
        _answer(145, 1, 7, day=6, body="  "), _answer(146, 2, 7, day=6, body='<p><img src="x.png" alt="pic"></p>'),
        _row(Id=150, PostTypeId=5, CreationDate="2015-01-02T00:00:00.000", Body="<p>tag wiki</p>"),
        _question(50, day=5, title="A later question", tags="<descaling>"),
    ]
    return _dump(tmp_path / "kettles.stackexchange.com" / "Posts.xml", rows)


# --- HTML to text ----------------------------------------------------------------------------


def test_html_to_text_keeps_paragraphs_lists_and_code():
    html = ("<p>Grind it   <em>fine</em>,\nthen &amp; only then brew &lt;slowly&gt;.</p>\n\n"
            "<pre><code>for cup in range(3):\n    brew(cup)\n</code></pre>\n"
            "<ul>\n<li>one</li>\n<li><p>two</p></li>\n</ul>\n<ol><li>first</li><li>second</li></ol>"
            '<p>See <a href="http://x.example">the guide</a><br>next line <img src="a.png" alt="enter image"></p>'
            "<blockquote><p>quoted</p></blockquote><p>caf&#xE9; &nbsp;x <code>inline()</code></p>")
    text = html_to_text(html)
    assert text.startswith("Grind it fine, then & only then brew <slowly>.\n\n")
    assert "for cup in range(3):\n    brew(cup)" in text  # code keeps its indentation and lines
    assert "- one\n- two" in text and "1. first\n2. second" in text
    assert "See the guide\nnext line" in text and "x.example" not in text and "image" not in text
    assert "quoted" in text and "café" in text and "inline()" in text
    assert "\n\n\n" not in text and text == text.strip()


def test_html_to_text_of_markup_only_is_empty():
    assert html_to_text('<p><img src="x.png" alt="pic"></p>\n') == ""
    assert html_to_text("") == ""


def test_first_tag_reads_both_tag_formats():
    assert first_tag("<espresso><grinder>") == "espresso"
    assert first_tag("|espresso|grinder|") == "espresso"
    assert first_tag("") is None and first_tag("||") is None


# --- parsing, skip rules, order ----------------------------------------------------------------


def test_answers_become_records_of_their_authors_in_time_order(dump):
    records, parts, summary = load_stackexchange(dump, num_devices=3, min_answers=3)
    users = [records[part[0]].user_id for part in parts]
    assert users == ["7", "3", "5"]  # most answers first; 3 and 5 tie at 4, the lower id first
    seven = [records[k].output for k in parts[0]]
    assert seven == ["First by seven", "Second by seven", "Third by seven", "Fourth by seven",
                     f"Fifth by seven {CANARY}"]
    three = [records[k] for k in parts[1]]
    assert [r.output for r in three] == ["a", "b", "c", "answer to a later question"]
    assert three[-1].instruction == "A later question" and three[-1].category == "descaling"
    first = records[parts[0][0]]
    assert first.instruction == "How do I descale a kettle?" and first.input == "It has limescale."
    assert first.question == "How do I descale a kettle?\nIt has limescale." and first.category == "kettle"
    assert all(records[k].user_id == "7" for k in parts[0])


def test_skipped_answers_are_counted_by_reason(dump):
    _, _, summary = load_stackexchange(dump, num_devices=3, min_answers=3)
    assert summary.to_dict() == {
        "rows": 31, "questions": 8, "answers": 22,
        "skipped": {"no_owner": 2, "edited_by_other": 2, "missing_question": 1, "empty_text": 2},
        "authors": 4, "eligible_authors": 3, "devices": 3, "records": 13}
    assert "edited_by_other=2" in "\n".join(summary.lines())


def test_min_answers_per_user_and_num_devices_choose_the_devices(dump):
    records, parts, summary = load_stackexchange(dump, num_devices=1, min_answers=5)
    assert [records[k].user_id for k in parts[0]] == ["7"] * 5 and summary.eligible_authors == 1
    _, parts, _ = load_stackexchange(dump, num_devices=4, min_answers=2)
    assert [len(p) for p in parts] == [5, 4, 4, 2]


def test_heldout_is_each_authors_last_answers(dump):
    pop = StackExchangePopulation(dump, num_devices=3, min_answers=3, heldout=2)
    assert isinstance(pop, Population) and pop.num_devices == 3
    stream, held = pop.stream(0), pop.heldout(0)
    assert [it.preferred for it in stream] == ["First by seven", "Second by seven", "Third by seven"]
    assert [it.preferred for it in held] == ["Fourth by seven", f"Fifth by seven {CANARY}"]
    times = [it.timestamp for it in stream + held]
    assert times == sorted(times) and all(it.kind == "data" for it in stream)
    assert len(pop.stream(1)) == 2 and len(pop.heldout(1)) == 2


def test_the_real_fragment_loads(tmp_path):
    records, parts, summary = load_stackexchange(FRAGMENT, num_devices=5, min_answers=4)
    assert (summary.rows, summary.questions, summary.answers) == (115, 40, 75)
    assert summary.skipped["edited_by_other"] == 3 and summary.skipped["no_owner"] == 0
    assert [records[p[0]].user_id for p in parts] == ["17", "4", "24", "76", "91"]
    assert [len(p) for p in parts] == [8, 6, 6, 6, 4]
    for part in parts:
        assert all(records[k].instruction and records[k].output for k in part)
        assert "<p>" not in records[part[0]].output and "&amp;" not in records[part[0]].output


# --- settings, end to end ------------------------------------------------------------------------


def test_settings_build_the_population(dump):
    settings = load_settings(None, ["population.source='stackexchange'", f"population.posts_path='{dump}'",
                                    "population.num_devices=2", "population.min_answers_per_user=4",
                                    "population.heldout=1"])
    pop = population_from_settings(settings.population)
    assert isinstance(pop, StackExchangePopulation) and pop.num_devices == 2
    assert [it.preferred for it in pop.heldout(0)] == [f"Fifth by seven {CANARY}"]
    assert len(pop.stream(0)) == 4 and pop.summary.devices == 2
    assert dataset_path(settings.population) == dump


def test_stackexchange_needs_posts_path():
    with pytest.raises(ConfigError, match="posts_path"):
        load_settings(None, ["population.source='stackexchange'"])
    with pytest.raises(ConfigError, match="min_answers_per_user"):
        load_settings(None, ["population.min_answers_per_user=1"])


def test_population_show_prints_the_summary(capsys):
    from simulations.cli import main

    assert main(["population", "show", "--set", "population.source='stackexchange'", "--set",
                 f"population.posts_path='{FRAGMENT}'", "--set", "population.num_devices=2", "--set",
                 "population.min_answers_per_user=6", "--set", "simulation.cohort_size=2", "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped answers: no_owner=0, edited_by_other=3" in out and "=== device 0" in out


# --- attribution ---------------------------------------------------------------------------------


def test_attribution_names_site_license_and_conversion(dump):
    settings = PopulationSettings(source="stackexchange", posts_path=str(dump))
    text = attribution_text(settings)
    assert "kettles.stackexchange.com" in text and "CC BY-SA 4.0" in text
    assert "https://creativecommons.org/licenses/by-sa/4.0/" in text and "HTML" in text and str(dump) in text
    older = attribution_text(settings.model_copy(update={"site": "coffee.stackexchange.com",
                                                          "content_license": "CC BY-SA 3.0"}))
    assert "coffee.stackexchange.com" in older and "by-sa/3.0/" in older and "kettles" not in older.split("(file")[0]
    assert attribution_text(PopulationSettings()) is None
    assert attribution_text(PopulationSettings(source="jsonl", jsonl_path="x.jsonl")) is None
    assert "set population.site" in site_name(dump.parent.parent / "Posts.xml")


def test_the_runner_writes_the_attribution_beside_config_toml(dump, tmp_path):
    from simulations import runner

    settings = Settings.model_validate({"population": {"source": "stackexchange", "posts_path": str(dump),
                                                       "num_devices": 2, "min_answers_per_user": 4}})
    assert runner.write_attribution(Settings(), tmp_path / "none") is None
    run_dir = tmp_path / "run"
    runner.write_run_inputs(settings, run_dir)  # what simulate writes before Ray starts
    assert (run_dir / "config.toml").is_file()
    assert (run_dir / ATTRIBUTION_FILE).read_text() == attribution_text(settings.population)
    assert '"dataset_sha256": "' in (run_dir / "inputs.json").read_text()  # the dump is fingerprinted for --resume


# --- bad input -----------------------------------------------------------------------------------


def _error(path: Path, num_devices: int = 1, min_answers: int = 2) -> str:
    with pytest.raises(DatasetError) as err:
        load_stackexchange(path, num_devices=num_devices, min_answers=min_answers)
    message = str(err.value)
    assert CANARY not in message and "Traceback" not in message
    return message


def test_missing_file_and_folder(tmp_path):
    message = _error(tmp_path / "nope" / "Posts.xml")
    assert "Stack Exchange dump not found" in message and "nope" in message and "population.posts_path" in message
    assert "a folder" in _error(tmp_path)


def test_a_file_that_is_not_posts_xml(tmp_path):
    users = _dump(tmp_path / "Users.xml", [_row(Id=1, DisplayName=CANARY)], root="users")
    message = _error(users)
    assert "Users.xml:2" in message and "root element is <users>, not <posts>" in message
    assert "population.posts_path" in message
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(f'{{"instruction": "{CANARY}"}}\n')
    assert "data.jsonl:1: not well-formed XML" in _error(jsonl)
    empty = tmp_path / "empty.xml"
    empty.write_text("")
    assert "empty.xml:1: not well-formed XML" in _error(empty)


def test_a_malformed_line_is_named(dump, tmp_path):
    lines = dump.read_text(encoding="utf-8").split("\n")
    lines[9] = lines[9].replace(' Score="1"', f' Score="1 {CANARY}').replace("/>", ">")
    bad = tmp_path / "Posts.xml"
    bad.write_text("\n".join(lines), encoding="utf-8")
    message = _error(bad)
    assert "Posts.xml:10: not well-formed XML" in message and "column" in message and "re-extract" in message


def test_a_truncated_dump_is_named(dump, tmp_path):
    cut = tmp_path / "Posts.xml"
    cut.write_bytes(dump.read_bytes()[:-200])
    assert "not well-formed XML" in _error(cut)


def test_bad_attribute_values_name_field_and_type(dump, tmp_path):
    text = dump.read_text(encoding="utf-8").replace('OwnerUserId="7"', f'OwnerUserId="{CANARY}"', 1)
    bad = _dump(tmp_path / "a" / "Posts.xml", [])
    bad.write_text(text, encoding="utf-8")
    message = _error(bad)
    assert "attribute OwnerUserId must be an integer, got a string of 15 character(s)" in message
    text = dump.read_text(encoding="utf-8").replace('CreationDate="2015-01-05T12', 'CreationDate="yesterday 12', 1)
    bad.write_text(text, encoding="utf-8")
    assert "attribute CreationDate must be a date" in _error(bad)


@pytest.mark.parametrize("prolog", [
    '<!DOCTYPE posts [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n',
    '<!-- a comment -->\n<!DOCTYPE posts SYSTEM "file:///etc/passwd">\n',
])
def test_entity_declarations_are_refused_before_parsing(tmp_path, prolog):
    bomb = _dump(tmp_path / "Posts.xml", [_answer(1, 1, 7, day=1, body="&b;")], prolog=prolog)
    message = _error(bomb)
    assert "declares a document type" in message and "Posts.xml:" in message


def test_utf16_and_binary_files_are_refused(tmp_path):
    text = '<?xml version="1.0" encoding="utf-16"?>\n<!DOCTYPE posts [<!ENTITY a "aa">]>\n<posts>&a;</posts>\n'
    utf16 = tmp_path / "Posts.xml"
    utf16.write_bytes(text.encode("utf-16"))
    assert "not UTF-8 text" in _error(utf16)
    utf16.write_bytes(text.encode("utf-16-le"))  # no byte-order mark
    assert "not UTF-8 text" in _error(utf16)
    utf16.write_bytes(b"7z\xbc\xaf\x27\x1c\x00\x04")  # the .7z archive itself
    assert "not UTF-8 text" in _error(utf16)


def test_a_prolog_too_long_to_check_is_refused(tmp_path):
    hidden = "<!-- " + "x" * (70 * 1024) + ' -->\n<!DOCTYPE posts [<!ENTITY a "aaaa">]>\n'
    message = _error(_dump(tmp_path / "Posts.xml", [_answer(1, 1, 7, day=1, body="&a;")], prolog=hidden))
    assert "no XML element in its first 64 KB" in message


def test_too_few_authors_says_how_many_there_are(dump):
    message = _error(dump, num_devices=4, min_answers=3)
    assert "too few authors: population.num_devices = 4 but only 3 of the 4 authors" in message
    assert "set population.num_devices to at most 3" in message
    assert "set population.min_answers_per_user to 2" in message
    message = _error(dump, num_devices=2, min_answers=20)
    assert "only 0 of the 4" in message and "at most 0" not in message and "the most active has 5" in message


def test_check_dataset_validates_the_dump_before_ray(dump):
    from simulations.validation import check_dataset

    settings = Settings.model_validate({"population": {"source": "stackexchange", "posts_path": str(dump),
                                                       "num_devices": 3, "min_answers_per_user": 3}})
    check_dataset(settings)
    with pytest.raises(DatasetError, match="too few authors"):
        check_dataset(settings.model_copy(update={"population": settings.population.model_copy(
            update={"num_devices": 9})}))


# --- a folder of dumps: authors of several sites pooled --------------------------------------------


@pytest.fixture
def sites(dump) -> Path:
    """The `dump` fixture's kettles site beside a teapots site whose user 7 (another person than
    kettles' 7) has 4 usable answers, tying with kettles' authors 3 and 5, and whose user 2 has 5."""
    rows = [_question(q, day=1, title=f"Teapot question {q}") for q in range(1, 6)]
    rows += [_answer(200 + q, q, 7, day=q + 1, body=f"<p>Teapot answer {q}</p>") for q in range(1, 5)]
    rows += [_answer(210 + q, q, 2, day=q + 1, body=f"<p>Pot {q}</p>") for q in range(1, 6)]
    _dump(dump.parent.parent / "teapots.stackexchange.com" / "Posts.xml", rows)
    return dump.parent.parent


def test_a_folder_of_dumps_pools_its_sites_authors(sites):
    records, parts, summary = load_stackexchange(sites, num_devices=5, min_answers=3)
    users = [records[p[0]].user_id for p in parts]
    # 5 answers: kettles/7 and teapots/2 (kettles first by site name); 4 answers: kettles/3, kettles/5, then teapots/7
    assert users == ["kettles.stackexchange.com/7", "teapots.stackexchange.com/2", "kettles.stackexchange.com/3",
                     "kettles.stackexchange.com/5", "teapots.stackexchange.com/7"]
    assert all(records[k].user_id == users[i] for i, part in enumerate(parts) for k in part)
    teapot7 = [records[k] for k in parts[4]]  # the same OwnerUserId on another site is another person
    assert [r.output for r in teapot7] == [f"Teapot answer {q}" for q in range(1, 5)]
    assert teapot7[0].instruction == "Teapot question 1"
    assert teapot7[0].source.endswith("teapots.stackexchange.com/Posts.xml")
    assert [records[k].output for k in parts[0]][0] == "First by seven"
    assert summary.sites == {"kettles.stackexchange.com": 3, "teapots.stackexchange.com": 2}
    assert (summary.rows, summary.authors, summary.eligible_authors) == (31 + 14, 6, 5)
    assert "devices per site: kettles.stackexchange.com=3, teapots.stackexchange.com=2" in summary.lines()
    assert summary.to_dict()["sites"] == {"kettles.stackexchange.com": 3, "teapots.stackexchange.com": 2}
    # one dump, as a file or as its folder: user ids stay plain, no per-site count
    for one in (sites / "kettles.stackexchange.com", sites / "kettles.stackexchange.com" / "Posts.xml"):
        records, parts, summary = load_stackexchange(one, num_devices=3, min_answers=3)
        assert [records[p[0]].user_id for p in parts] == ["7", "3", "5"] and not summary.sites


def test_a_folder_of_dumps_through_settings_attribution_and_digest(sites):
    from simulations.validation import dataset_digest

    settings = load_settings(None, ["population.source='stackexchange'", f"population.posts_path='{sites}'",
                                    "population.num_devices=5", "population.min_answers_per_user=3"])
    pop = population_from_settings(settings.population)
    assert pop.num_devices == 5 and pop.summary.sites["teapots.stackexchange.com"] == 2
    text = attribution_text(settings.population)
    assert "kettles.stackexchange.com, teapots.stackexchange.com" in text and "SITE/OwnerUserId" in text
    before = dataset_digest(settings)
    assert before == dataset_digest(settings)
    teapots = sites / "teapots.stackexchange.com" / "Posts.xml"
    teapots.write_text(teapots.read_text().replace("Pot 5", "Pot five"))
    assert dataset_digest(settings) != before  # a change in any site's dump is a changed dataset (resume refuses)


def test_a_folder_without_dumps_is_refused(tmp_path):
    (tmp_path / "empty.stackexchange.com").mkdir()
    (tmp_path / "notes.txt").write_text(CANARY)
    message = _error(tmp_path)
    assert "no Posts.xml in it or in any folder directly under it" in message and "SITE/Posts.xml" in message
