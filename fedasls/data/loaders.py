"""Real local data: JSONL instruction records (Alpaca / Dolly shape), partitioners, and a
population whose device streams come from a file.

Accepted keys per line (a JSON object):
  instruction (required, str)
  input | context (optional, str)        appended to the question
  output | response (required, str)      the user's preferred answer
  category (optional, str)               the ground-truth domain
  user_id (optional, str or int)         needed by partition="user"
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedasls.errors import FedaslsError
from fedasls.interaction import Interaction, Persona, STREAM_EPOCH
from fedasls.data.lexicon import GENERAL, RESERVED, DomainLexicons, default_lexicons

EXPECTED_KEYS = "instruction, input|context, output|response, category, user_id"
_GENERIC_RESPONSES = (
    "Here is a general answer. The details depend on your situation, so weigh the main options carefully.",
    "That is a good question. In general, start with the basics and adjust as you learn more.",
    "A common approach works for most people. Consider your goals and pick the simplest option first.",
)


class DatasetError(FedaslsError, ValueError):
    """A dataset file or line is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    """One instruction example read from a JSONL file."""

    instruction: str
    input: str
    output: str
    category: str | None
    user_id: str | None
    source: str
    line: int

    @property
    def question(self) -> str:
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


def shape_of(value: object) -> str:
    """What a value is, never what it holds (error messages must not quote data)."""
    if isinstance(value, (list, tuple, dict)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} of {len(value)} item(s)"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "a number", float: "a number"}.get(type(value), f"a {type(value).__name__}")


def _field(obj: dict, names: tuple[str, ...], where: str, required: bool) -> str | None:
    for name in names:
        if name in obj and obj[name] is not None:
            value = obj[name]
            if not isinstance(value, str):
                raise DatasetError(f"{where}: field '{name}' must be a string, got {shape_of(value)}; "
                                   "quote it in the file")
            return value
    if required:
        raise DatasetError(f"{where}: missing field '{'|'.join(names)}' (expected keys: {EXPECTED_KEYS})")
    return None


def load_jsonl(path: str | Path) -> list[Record]:
    """Read instruction records; blank lines are skipped, any malformed line raises DatasetError."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p} (set population.jsonl_path to an existing .jsonl file)")
    records: list[Record] = []
    with p.open("rb") as fh:
        for lineno, raw_bytes in enumerate(fh, start=1):
            where = f"{p.name}:{lineno}"
            try:
                raw = raw_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(f"{p}:{lineno}: not UTF-8 text (byte 0x{raw_bytes[err.start]:02x} at column "
                                   f"{err.start + 1}); save the file as UTF-8, e.g. "
                                   f"`iconv -f latin1 -t utf-8 {p.name} > fixed.jsonl`") from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); "
                                   "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__} "
                                   f"(expected keys: {EXPECTED_KEYS})")
            instruction = _field(obj, ("instruction",), where, required=True)
            if not instruction.strip():
                raise DatasetError(f"{where}: field 'instruction' is empty; give every record an instruction")
            user = obj.get("user_id")
            if user is not None and (isinstance(user, bool) or not isinstance(user, (str, int))):
                raise DatasetError(f"{where}: field 'user_id' must be a string or integer, got {shape_of(user)}")
            records.append(Record(
                instruction=instruction.strip(),
                input=(_field(obj, ("input", "context"), where, required=False) or "").strip(),
                output=_field(obj, ("output", "response"), where, required=True).strip(),
                category=_field(obj, ("category",), where, required=False) or None,
                user_id=None if user is None else str(user),
                source=str(p), line=lineno,
            ))
    if not records:
        raise DatasetError(f"{p}: no records found; the file needs one JSON object per line")
    return records


def _check_devices(n: int, num_devices: int) -> None:
    if num_devices < 1:
        raise DatasetError(f"num_devices must be >= 1 (got {num_devices})")
    if num_devices > n:
        raise DatasetError(f"num_devices ({num_devices}) exceeds the number of records ({n}); "
                           "lower population.num_devices")


def partition_by_user(records: Sequence[Record]) -> list[list[int]]:
    """One device per distinct user_id (first-appearance order), record indices in file order."""
    groups: dict[str, list[int]] = {}
    for k, r in enumerate(records):
        if r.user_id is None:
            raise DatasetError(f"{Path(r.source).name}:{r.line}: missing field 'user_id' needed by "
                               "partition='user'; add user_id to every line or use partition='iid'/'dirichlet'")
        groups.setdefault(r.user_id, []).append(k)
    return list(groups.values())


def partition_iid(n: int, num_devices: int, seed: int = 0) -> list[list[int]]:
    """Shuffle n indices and split them into num_devices near-equal parts (sizes differ by <= 1)."""
    _check_devices(n, num_devices)
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(int(x) for x in part) for part in np.array_split(perm, num_devices)]


def partition_dirichlet(labels: Sequence[str], num_devices: int, alpha: float, seed: int = 0) -> list[list[int]]:
    """Label-skewed split: each label's indices are divided by proportions ~ Dirichlet(alpha).

    Small alpha gives each device few labels. Devices left empty receive one index from the
    largest device, so every device has data when there are at least as many records.
    """
    _check_devices(len(labels), num_devices)
    if alpha <= 0:
        raise DatasetError(f"dirichlet alpha must be > 0 (got {alpha})")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    by_label: dict[str, list[int]] = {}
    for k, label in enumerate(labels):
        by_label.setdefault(label, []).append(k)
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        props = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for dev, chunk in enumerate(np.split(idx, cuts)):
            parts[dev].extend(int(x) for x in chunk)
    for dev in range(num_devices):
        if not parts[dev]:
            donor = max(range(num_devices), key=lambda d: len(parts[d]))
            parts[dev].append(parts[donor].pop())
    return [sorted(p) for p in parts]


def records_lexicons(records: Sequence[Record], seed: int = 0, top_k: int = 60) -> DomainLexicons:
    """Lexicons derived from the records' own categories, or the default ones if none has a category."""
    labelled = [(r.category, f"{r.question} {r.output}") for r in records if r.category]
    if not any(c not in RESERVED for c, _ in labelled):
        return default_lexicons(seed)
    return DomainLexicons.from_labelled(labelled, top_k=top_k)


class RecordPopulation:
    """A population whose devices are given lists of records (indices into `records`).

    Each device's records, in the given order, become its stream (kind="data", synthetic
    increasing timestamps); the last `heldout` records (at most half) are held out.
    `question` = instruction (+ input), `preferred` = the record's output, `response` = a
    generic domain-neutral placeholder, `domain` = category, else the lexicon tag.
    `lexicons` (used by devices to tag text) are derived from the records' categories when
    they have any (see `records_lexicons`), else the default synthetic-domain lexicons.
    """

    def __init__(self, records: list[Record], parts: list[list[int]], seed: int = 0, heldout: int = 8,
                 lexicons: DomainLexicons | None = None) -> None:
        self.records = records
        self.parts = parts
        self.seed = seed
        self.num_heldout = heldout
        self.lexicons = lexicons or records_lexicons(self.records, seed)
        self.domains = [r.category or self.lexicons.tag(r.question + " " + r.output) for r in self.records]

    @property
    def num_devices(self) -> int:
        return len(self.parts)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.num_devices:
            raise IndexError(f"device id {i} out of range: this population has devices 0..{self.num_devices - 1}")

    def _split(self, i: int) -> int:
        """Number of records of device i that stay in its stream."""
        n = len(self.parts[i])
        return n - min(self.num_heldout, n // 2)

    def _interactions(self, i: int) -> list[Interaction]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, i, 3]))
        t = STREAM_EPOCH + rng.uniform(0, 7 * 86400)
        out = []
        for index, k in enumerate(self.parts[i]):
            t += float(rng.exponential(3600) + 30)
            r = self.records[k]
            response = _GENERIC_RESPONSES[int(rng.integers(len(_GENERIC_RESPONSES)))]
            out.append(Interaction(i, index, t, r.question, response, r.output, self.domains[k], "data"))
        return out

    def persona(self, i: int) -> Persona:
        """Interests = the device's most frequent domains (up to 3); style from answer lengths."""
        self._check(i)
        counts = Counter(self.domains[k] for k in self.parts[i] if self.domains[k] != GENERAL)
        interests = tuple(d for d, _ in counts.most_common(3)) or (GENERAL,)
        words = float(np.median([len(self.records[k].output.split()) for k in self.parts[i]]))
        length = "short" if words < 20 else "medium" if words < 60 else "long"
        style = {"length": length, "formality": "unknown", "signature": "", "signature_at": "end", "name": ""}
        return Persona(device_id=i, interests=interests, style=style)

    def stream(self, i: int) -> list[Interaction]:
        self._check(i)
        return self._interactions(i)[: self._split(i)]

    def heldout(self, i: int) -> list[Interaction]:
        self._check(i)
        return self._interactions(i)[self._split(i):]


class JsonlPopulation(RecordPopulation):
    """A population whose devices are partitions of a local JSONL instruction file (see
    `RecordPopulation` for how records become streams).

    For partition="user", devices are the first `num_devices` distinct users
    (all users when num_devices is None).
    """

    def __init__(self, path: str | Path, partition: str = "iid", num_devices: int | None = None, seed: int = 0,
                 heldout: int = 8, alpha: float = 0.5, lexicons: DomainLexicons | None = None) -> None:
        super().__init__(load_jsonl(path), [], seed=seed, heldout=heldout, lexicons=lexicons)
        if partition == "user":
            parts = partition_by_user(self.records)
            self.parts = parts[:num_devices] if num_devices is not None else parts
        elif partition == "iid":
            self.parts = partition_iid(len(self.records), num_devices or 1, seed)
        elif partition == "dirichlet":
            self.parts = partition_dirichlet(self.domains, num_devices or 1, alpha, seed)
        else:
            raise DatasetError(f"unknown partition '{partition}'; use 'user', 'dirichlet' or 'iid'")
