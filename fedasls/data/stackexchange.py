"""Real users from a Stack Exchange data dump: one device per answer author.

Each answer (PostTypeId 2) in a site's `Posts.xml` is a record: its question's title and body are
the instruction, the answer's body is the output, the answer's author (OwnerUserId) is its user;
each author's answers are in time order (CreationDate, then Id). Bodies are HTML and become plain
text here (paragraph breaks and code blocks kept). An answer is skipped, and counted, when

  no_owner          it has no OwnerUserId (a deleted user) or belongs to the Community user (-1);
  edited_by_other   its last editor is someone other than its author (the text is not only theirs);
  missing_question  its question (ParentId) is not in the file;
  empty_text        its body is empty, or nothing but markup (an image alone).

Devices are the `num_devices` authors with the most usable answers, at least `min_answers` each,
ties broken by user id. `path` is one Posts.xml, or a folder of dumps (one SITE/Posts.xml per site,
as they unpack, e.g. coffee.stackexchange.com/Posts.xml): then authors of every site compete for the
devices, an author is a site's user (user id "SITE/OwnerUserId"), and ties go to the site first in
name order, then the lower user id. Each file is read as a stream, three times (count authors; their
answers; the questions those answers need), so memory holds the question ids, a count per author and the
chosen devices' text, never the whole XML. A document type declaration is refused before parsing
(the dumps have none; it is where entity-expansion tricks live), and errors name the file, line
and field, never a post's text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from xml.etree.ElementTree import ParseError, XMLPullParser

from fedasls.data.lexicon import DomainLexicons
from fedasls.data.loaders import DatasetError, Record, RecordPopulation

ROOT = "posts"
QUESTION, ANSWER = "1", "2"
SKIP_REASONS = ("no_owner", "edited_by_other", "missing_question", "empty_text")
LICENSE_URLS = {
    "CC BY-SA 4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
    "CC BY-SA 3.0": "https://creativecommons.org/licenses/by-sa/3.0/",
    "CC BY-SA 2.5": "https://creativecommons.org/licenses/by-sa/2.5/",
}
_PIECE = 1 << 20  # bytes fed to the parser at a time (a line, or a piece of a longer one)
_PROLOG_LIMIT = 1 << 16  # the XML declaration and comments before <posts> must fit in this
_FIX_FILE = ("set population.posts_path to the Posts.xml of a Stack Exchange data dump "
             "(https://archive.org/details/stackexchange; one .7z per site)")

# --- HTML to plain text ------------------------------------------------------------------------

_BLOCKS = frozenset({"p", "div", "blockquote", "pre", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
                     "table", "tr", "dl", "dt", "dd"})
_SKIPPED = frozenset({"script", "style"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.pre = 0
        self.skip = 0
        self.lists: list[list[int]] = []  # per open list: [ordered?, next number]
        self.line_start = True  # outside <pre>, whitespace at a line's start is dropped
        self.after_marker = False  # a list item's "- " was written, its text not yet

    def _break(self, blank: bool = True) -> None:
        if self.after_marker:  # <li><p>text: the text stays on the marker's line
            return
        self.parts.append("\n\n" if blank else "\n")
        self.line_start = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self.skip += 1
        elif tag == "br":
            self._break(blank=False)
        elif tag in ("ul", "ol"):
            self.lists.append([tag == "ol", 1])
            self._break()
        elif tag == "li":
            self._break(blank=False)
            if self.lists and self.lists[-1][0]:
                self.parts.append(f"{self.lists[-1][1]}. ")
                self.lists[-1][1] += 1
            else:
                self.parts.append("- ")
            self.after_marker = True
        elif tag in _BLOCKS:
            self._break()
            if tag == "pre":
                self.pre += 1
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self.skip = max(0, self.skip - 1)
        elif tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._break()
        elif tag in _BLOCKS and tag != "li":
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
            self._break()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        # inside <pre> (code blocks) the text is kept as it is; elsewhere HTML collapses whitespace
        if self.pre:
            self.after_marker = False
            self.parts.append(data)
            self.line_start = data.endswith("\n")
            return
        data = _SPACES.sub(" ", data)
        if self.line_start:
            data = data.lstrip()
        if data:
            self.parts.append(data)
            self.line_start = self.after_marker = False

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.parts).split("\n")]
        # a line that was only a space between two blocks is empty; then at most one blank line in a row
        return _BLANKS.sub("\n\n", "\n".join(line if line.strip() else "" for line in lines)).strip("\n").strip()


_SPACES = re.compile(r"\s+")
_TAGS = re.compile(r"<[^>]*>")
_BLANKS = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    """Plain text of a post body: paragraphs and list items on their own lines, code blocks
    verbatim, character references decoded, markup (images, links' targets) dropped."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


# --- streaming the XML -------------------------------------------------------------------------


def _check_prolog(path: Path, head: bytes) -> None:
    """Refuse a document type declaration (entities live there) before the parser sees the file;
    a file whose first element is not <posts> is refused later, by _rows."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head[:4096]:
        raise DatasetError(f"{path}: not UTF-8 text (UTF-16 or binary); Stack Exchange dumps are UTF-8 XML, and only "
                           f"UTF-8 can be checked for a document type declaration before parsing. Fix: {_FIX_FILE}")
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    pos = 0
    too_long = DatasetError(f"{path}: no XML element in its first {_PROLOG_LIMIT // 1024} KB; a Posts.xml starts "
                            f"with <?xml ...?> and <{ROOT}>. Fix: {_FIX_FILE}")
    while True:
        lt = text.find("<", pos)
        if lt < 0:
            if len(head) >= _PROLOG_LIMIT:
                raise too_long
            return  # the parser reports an empty or truncated file
        if text.startswith("<?", lt):
            end = text.find("?>", lt)
        elif text.startswith("<!--", lt):
            end = text.find("-->", lt)
        elif text.startswith("<!", lt):
            line = text.count("\n", 0, lt) + 1
            raise DatasetError(f"{path}:{line}: the file declares a document type (<!DOCTYPE or <!ENTITY); "
                               "Stack Exchange dumps have none, and entity declarations can make a small file expand "
                               f"without bound, so it is refused. Fix: {_FIX_FILE}, or remove the declaration")
        else:
            return  # the first element
        if end < 0:  # a declaration or comment that does not end in the head
            if len(head) >= _PROLOG_LIMIT:
                raise too_long
            return  # the parser reports the truncated file
        pos = end + 2


@dataclass
class _Row:
    attrib: dict[str, str]
    line: int


def _rows(path: Path) -> Iterator[_Row]:
    """Every <row> under <posts>, as its attributes and line, read as a stream."""
    if not path.is_file():
        raise DatasetError(f"Stack Exchange dump not found: {path} ({'a folder' if path.is_dir() else 'no such file'})."
                           f" Fix: {_FIX_FILE}")
    with path.open("rb") as fh:
        _check_prolog(path, fh.read(_PROLOG_LIMIT))
        fh.seek(0)
        parser = XMLPullParser(events=("start", "end"))
        depth, line, root = 0, 1, None
        while True:
            piece = fh.readline(_PIECE)
            try:
                if piece:
                    parser.feed(piece)
                else:
                    parser.close()
                events = list(parser.read_events())
            except ParseError as err:
                at, col = err.position
                raise DatasetError(f"{path}:{at}: not well-formed XML ({_expat_reason(err)} at column {col + 1}). "
                                   f"A Posts.xml is one <row .../> element per line inside <{ROOT}>. Fix: {_FIX_FILE}; "
                                   "re-extract it if the download was cut short") from None
            for event, elem in events:
                if event == "start":
                    depth += 1
                    if depth == 1:
                        root = elem
                        if elem.tag != ROOT:
                            raise DatasetError(
                                f"{path}:{line}: the root element is <{_name(elem.tag)}>, not <{ROOT}>: this is not "
                                f"a Stack Exchange Posts.xml (a dump also holds Users.xml, Comments.xml, ...). "
                                f"Fix: {_FIX_FILE}")
                    continue
                depth -= 1
                if depth == 1 and elem.tag == "row":
                    yield _Row(dict(elem.attrib), line)
                if depth == 1 and root is not None:
                    root.clear()  # drop what was read: memory stays one row deep
            if not piece:
                return
            if piece.endswith(b"\n"):
                line += 1


def _expat_reason(err: ParseError) -> str:
    """The parser's reason without its position (which we give as file:line); never data."""
    return re.sub(r":\s*line \d+, column \d+$", "", str(err)) or "parse error"


def _name(tag: str) -> str:
    return tag if len(tag) <= 40 and re.fullmatch(r"[\w.:{}/-]+", tag) else "an element of another kind"


def _int(row: _Row, key: str, path: Path, required: bool = True) -> int | None:
    value = row.attrib.get(key)
    if value is None or value == "":
        if required:
            raise DatasetError(f"{path}:{row.line}: a <row> has no {key} attribute; every post of a Posts.xml has one. "
                               f"Fix: {_FIX_FILE}")
        return None
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path}:{row.line}: attribute {key} must be an integer, got a string of "
                           f"{len(value)} character(s). Fix: {_FIX_FILE}") from None


def _date(row: _Row, path: Path) -> datetime:
    value = row.attrib.get("CreationDate", "")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise DatasetError(f"{path}:{row.line}: attribute CreationDate must be a date like 2015-01-27T20:09:32.720, "
                           f"got a string of {len(value)} character(s). Fix: {_FIX_FILE}") from None


# --- the population ----------------------------------------------------------------------------


@dataclass
class DumpSummary:
    """What the dump held and what was used; counts only, never text."""

    rows: int = 0
    questions: int = 0
    answers: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> answers (SKIP_REASONS)
    authors: int = 0  # authors with at least one usable answer
    eligible_authors: int = 0  # ... with at least min_answers
    devices: int = 0
    records: int = 0  # answers used (those of the devices' authors)
    sites: Counter = field(default_factory=Counter)  # site -> devices (a folder of dumps; else empty)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "questions": self.questions, "answers": self.answers,
                "skipped": {reason: self.skipped.get(reason, 0) for reason in SKIP_REASONS},
                "authors": self.authors, "eligible_authors": self.eligible_authors, "devices": self.devices,
                "records": self.records, **({"sites": dict(self.sites)} if self.sites else {})}

    def lines(self) -> list[str]:
        skipped = ", ".join(f"{reason}={self.skipped.get(reason, 0)}" for reason in SKIP_REASONS)
        per_site = ", ".join(f"{site}={n}" for site, n in sorted(self.sites.items()))
        return [f"{self.rows} rows: {self.questions} questions, {self.answers} answers",
                f"skipped answers: {skipped}",
                f"{self.authors} authors with usable answers, {self.eligible_authors} with enough; "
                f"{self.devices} devices hold {self.records} answers"] + ([f"devices per site: {per_site}"]
                                                                          if self.sites else [])


def first_tag(tags: str) -> str | None:
    """A question's first tag, the record's category: "<espresso><grinder>" (older dumps) or
    "|espresso|grinder|" (dumps since 2024)."""
    found = re.findall(r"<([^<>]+)>", tags) or [t for t in tags.split("|") if t.strip()]
    return found[0].strip() if found else None


def _skip_reason(row: _Row, owner: int | None) -> str | None:
    """Why an answer is not a record of its author (the question's presence is checked apart)."""
    if owner is None or owner < 1:
        return "no_owner"
    editor = row.attrib.get("LastEditorUserId")
    if editor not in (None, "", str(owner)) or (editor in (None, "") and row.attrib.get("LastEditorDisplayName")):
        return "edited_by_other"
    if not _TAGS.sub("", row.attrib.get("Body", "")).strip():  # blank, or only markup (an image)
        return "empty_text"
    return None


def dump_files(path: str | Path) -> list[tuple[str | None, Path]]:
    """The Posts.xml files a path names, each with its site: a file (site None); a folder holding a
    Posts.xml (that file, site None); or a folder of dumps, one SITE/Posts.xml each (sorted by SITE).
    Reads no data."""
    p = Path(path)
    if not p.is_dir() or (p / "Posts.xml").is_file():
        return [(None, p / "Posts.xml" if p.is_dir() else p)]
    found = sorted((d.name, d / "Posts.xml") for d in p.iterdir() if d.is_dir() and (d / "Posts.xml").is_file())
    if not found:
        raise DatasetError(f"{p}: a folder with no Posts.xml in it or in any folder directly under it. Fix: "
                           f"{_FIX_FILE}; a folder of dumps holds one SITE/Posts.xml per site")
    return found


def _count(p: Path, summary: DumpSummary) -> tuple[set[int], Counter]:
    """First pass over one dump: its question ids and each author's usable answers (adds to summary)."""
    questions: set[int] = set()
    counts: Counter[int] = Counter()
    pending: list[tuple[int, int]] = []  # (author, question) of answers seen before their question
    for row in _rows(p):
        summary.rows += 1
        kind = row.attrib.get("PostTypeId")
        if kind == QUESTION:
            summary.questions += 1
            questions.add(_int(row, "Id", p))
        elif kind == ANSWER:
            summary.answers += 1
            _int(row, "Id", p)
            owner = _int(row, "OwnerUserId", p, required=False)
            parent = _int(row, "ParentId", p)
            _date(row, p)
            reason = _skip_reason(row, owner)
            if reason:
                summary.skipped[reason] += 1
            elif parent in questions:
                counts[owner] += 1
            else:
                pending.append((owner, parent))
    for owner, parent in pending:
        if parent in questions:
            counts[owner] += 1
        else:
            summary.skipped["missing_question"] += 1
    return questions, counts


def _records(p: Path, chosen: dict[int, int], questions: set[int],
             summary: DumpSummary) -> list[tuple[int, datetime, int, Record]]:
    """Second and third passes over one dump: the chosen authors' (author -> rank) answers as records,
    each with its rank, date and id (to sort by)."""
    answers: list[tuple[int, datetime, int, int, str, int]] = []  # (rank, date, id, question, text, line)
    needed: set[int] = set()
    for row in _rows(p):
        if row.attrib.get("PostTypeId") != ANSWER:
            continue
        owner = _int(row, "OwnerUserId", p, required=False)
        if owner not in chosen or _skip_reason(row, owner):
            continue
        parent = _int(row, "ParentId", p)
        if parent not in questions:
            continue
        text = html_to_text(row.attrib["Body"])
        if not text:
            summary.skipped["empty_text"] += 1
            continue
        answers.append((chosen[owner], _date(row, p), _int(row, "Id", p), parent, text, row.line))
        needed.add(parent)

    asked: dict[int, tuple[str, str, str | None]] = {}  # id -> (title, body text, first tag)
    for row in _rows(p):
        if row.attrib.get("PostTypeId") != QUESTION:
            continue
        qid = _int(row, "Id", p)
        if qid in needed:
            title = _SPACES.sub(" ", row.attrib.get("Title", "")).strip()
            asked[qid] = (title, html_to_text(row.attrib.get("Body", "")), first_tag(row.attrib.get("Tags", "")))

    out = []
    for rank, date, aid, parent, text, line in answers:
        title, body, tag = asked[parent]
        instruction, extra = (title, body) if title else (body, "")
        if not instruction:
            summary.skipped["missing_question"] += 1  # a question with neither title nor text
            continue
        out.append((rank, date, aid, Record(instruction=instruction, input=extra, output=text, category=tag,
                                            user_id="", source=str(p), line=line)))
    return out


def load_stackexchange(path: str | Path, num_devices: int,
                       min_answers: int = 20) -> tuple[list[Record], list[list[int]], DumpSummary]:
    """Records of the `num_devices` most active authors (each with >= min_answers usable answers),
    one part per author, most active first, each in time order; and the counts of what was skipped.
    `path`: a Posts.xml, or a folder of dumps (see the module's docstring)."""
    p = Path(path)
    if num_devices < 1:
        raise DatasetError(f"num_devices must be >= 1 (got {num_devices})")
    files = dump_files(p)
    summary = DumpSummary()
    questions: list[set[int]] = []
    counts: Counter[tuple[int, int]] = Counter()  # (dump index, author) -> usable answers
    for k, (_, file) in enumerate(files):
        asked, per_author = _count(file, summary)
        questions.append(asked)
        counts.update({(k, author): n for author, n in per_author.items()})
    summary.authors = len(counts)
    sites = [site or "" for site, _ in files]
    ranked = sorted((a for a, n in counts.items() if n >= min_answers), key=lambda a: (-counts[a], sites[a[0]], a[1]))
    summary.eligible_authors = len(ranked)
    if len(ranked) < num_devices:
        top = sorted(counts.values(), reverse=True)
        fixes = [f"set population.num_devices to at most {len(ranked)}"] if ranked else []
        if len(top) >= num_devices and top[num_devices - 1] >= 2:
            fixes.append(f"set population.min_answers_per_user to {top[num_devices - 1]} (the {num_devices} most "
                         "active authors have at least that many)")
        fixes.append("use a larger site's dump" + (", or a folder of several sites' dumps" if len(files) == 1 else ""))
        raise DatasetError(
            f"{p}: too few authors: population.num_devices = {num_devices} but only {len(ranked)} of the "
            f"{len(counts)} authors with usable answers have at least population.min_answers_per_user = "
            f"{min_answers} (the most active has {top[0] if top else 0}; {summary.answers} answers in "
            f"{summary.rows} rows; skipped: {', '.join(f'{r}={summary.skipped.get(r, 0)}' for r in SKIP_REASONS)}). "
            f"Fix: {', or '.join(fixes)}.")
    chosen = ranked[:num_devices]
    rows: list[tuple[int, datetime, int, Record]] = []
    for k, (site, file) in enumerate(files):
        mine = {author: rank for rank, (d, author) in enumerate(chosen) if d == k}
        if mine:
            rows += _records(file, mine, questions[k], summary)
    questions.clear()

    records: list[Record] = []
    parts: list[list[int]] = [[] for _ in chosen]
    for rank, _, _, record in sorted(rows, key=lambda a: (a[0], a[1], a[2])):
        d, author = chosen[rank]
        parts[rank].append(len(records))
        records.append(replace(record, user_id=f"{sites[d]}/{author}" if files[d][0] else str(author)))
    summary.devices = len(parts)
    summary.records = len(records)
    summary.sites = Counter(sites[d] for d, _ in chosen) if files[0][0] else Counter()
    return records, parts, summary


class StackExchangePopulation(RecordPopulation):
    """One device per answer author of a Stack Exchange dump (see the module's docstring).

    Device i is the i-th most active author; its stream is its answers in time order (on the
    same synthetic clock as a JSONL population: the order is real, the spacing is not), and its
    last `heldout` answers (at most half) are held out as its future interactions. `summary`
    counts what the dump held, what was skipped and why, and what was used.
    """

    def __init__(self, path: str | Path, num_devices: int, min_answers: int = 20, seed: int = 0, heldout: int = 8,
                 lexicons: DomainLexicons | None = None) -> None:
        records, parts, self.summary = load_stackexchange(path, num_devices, min_answers)
        super().__init__(records, parts, seed=seed, heldout=heldout, lexicons=lexicons)


def site_name(path: str | Path, site: str | None = None) -> str:
    """The site a dump comes from: as given, else the name of its folder when that looks like a
    site's domain (the dumps unpack to e.g. coffee.stackexchange.com/Posts.xml)."""
    if site:
        return site
    folder = Path(path).resolve().parent.name
    return folder if "." in folder else "a Stack Exchange site (set population.site to name it)"


def attribution(path: str | Path, site: str | None = None, license: str = "CC BY-SA 4.0") -> str:
    """The credit a run on this dump owes its authors (CC BY-SA: who, where, which license, what changed).
    A folder of dumps credits each site (its SITE folder's name); `site` names a single dump's site."""
    p = Path(path)
    sites = [name for name, _ in dump_files(p)] if p.is_dir() and not (p / "Posts.xml").is_file() else []
    url = LICENSE_URLS.get(license, "")
    if sites:
        source = (f"the Stack Exchange data dumps of {', '.join(sites)}\n(folder: {path}, one SITE/Posts.xml "
                  "each)")
        profile = ("profile: https://SITE/users/<OwnerUserId>; post: https://SITE/a/<Id>; a device's user id is "
                   "SITE/OwnerUserId")
    else:
        name = site_name(path, site)
        where = f"https://{name}" if " " not in name else "the site"
        source = f"the Stack Exchange data dump of {name}\n(file: {path})"
        profile = f"profile: {where}/users/<OwnerUserId>; post: {where}/a/<Id>"
    return (
        f"This run's device data comes from {source}, content written by the site's users, published by\n"
        f"Stack Exchange, Inc.\n"
        f"\n"
        f"License: {license}{f' ({url})' if url else ''}.\n"
        f"Authors: each record's author is the user named by its answer's OwnerUserId\n"
        f"({profile}).\n"
        f"Changes: the posts' HTML was converted to plain text; each answer was paired with its\n"
        f"question's title and text; answers last edited by someone other than their author, by\n"
        f"deleted users, or without their question were left out. Anything derived from this\n"
        f"data and shared must credit its authors and carry the same license.\n"
    )
