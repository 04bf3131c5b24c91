"""Domain lexicons and the two lexicon metrics of Qin et al. (domain tag and DSS).

- tag:  Dom(T) = argmax_i |T ∩ l_i|  (T = set of tokens; ties -> first domain in order;
        no overlap at all -> "general").
- dss:  (1/m) Σ_i |T ∩ l_i| / n       (n = number of tokens of T, m = number of domains;
        0 for empty text).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fedasls.data.population import DOMAINS, public_corpus

GENERAL = "general"
"""Tag of a text that shares no word with any lexicon."""

RESERVED = frozenset({"chatter", GENERAL})
"""Labels that are never lexicon domains (chatter is low-value text, not a domain)."""

STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing don't down during each few for from further
get got had has have having he her here hers him his how i i'm if in into is it it's its just
me more most my no nor not now of off on once only or other our ours out over own same she should
so some such than that that's the their theirs them then there these they this those through to
too under until up very was we were what what's when where which while who whom why will with
would you you're your yours yourself help helps it's let make makes good best way well really
question answer thing things much many one two every keep try start before after
""".split())

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class LexiconError(ValueError):
    """A lexicon file or mapping is malformed; the message says where and how to fix it."""


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (letters/digits, inner apostrophes kept)."""
    return _TOKEN.findall(text.lower())


class DomainLexicons:
    """One word set per domain, in a fixed order (the order breaks tag ties)."""

    def __init__(self, words: Mapping[str, Iterable[str]]) -> None:
        if not words:
            raise LexiconError("a lexicon needs at least one domain, e.g. {'cooking': ['recipe', 'oven']}")
        for domain in words:
            if not isinstance(domain, str) or not domain:
                raise LexiconError(f"domain names must be non-empty strings (got {domain!r})")
            if domain in RESERVED:
                raise LexiconError(f"'{domain}' is reserved and cannot be a lexicon domain; remove or rename it")
        self.domains: tuple[str, ...] = tuple(words)
        self.words: dict[str, frozenset[str]] = {d: frozenset(w.lower() for w in ws) for d, ws in words.items()}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}={len(self.words[d])}" for d in self.domains)
        return f"DomainLexicons({sizes})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DomainLexicons) and self.domains == other.domains and self.words == other.words

    @classmethod
    def from_labelled(cls, texts: Sequence[tuple[str, str]], top_k: int = 60,
                      domains: Sequence[str] | None = None, min_count: int = 2,
                      min_log_odds: float = math.log(3.0)) -> "DomainLexicons":
        """Distinctive words per label from (label, text) pairs.

        A word's score in a domain is the smoothed log ratio of its relative frequency in
        that domain vs all other texts (chatter included); stopwords, pure numbers and
        words seen fewer than `min_count` times in the domain are dropped, and the `top_k`
        words scoring above `min_log_odds` form the lexicon. `domains` fixes the order
        (default: first appearance); reserved labels ("chatter", "general") never become
        domains but still count as "rest" text.
        """
        counts: dict[str, Counter[str]] = {}
        for label, text in texts:
            counts.setdefault(label, Counter()).update(
                t for t in tokenize(text) if t not in STOPWORDS and not t.isdigit() and len(t) > 1)
        order = list(domains) if domains is not None else [d for d in counts if d not in RESERVED]
        missing = [d for d in order if d not in counts]
        if missing:
            raise LexiconError(f"no labelled texts for domains {missing}; add texts or drop them from `domains`")
        if not order:
            raise LexiconError("no domain labels found (only reserved labels like 'chatter'); label texts by domain")
        total = Counter()
        for c in counts.values():
            total.update(c)
        vocab = len(total)
        grand = sum(total.values())
        out: dict[str, list[str]] = {}
        for d in order:
            own, n_own = counts[d], sum(counts[d].values())
            n_rest = grand - n_own
            scored = []
            for w, c in own.items():
                if c < min_count:
                    continue
                rest = total[w] - c
                score = math.log((c + 0.5) / (n_own + 0.5 * vocab)) - math.log((rest + 0.5) / (n_rest + 0.5 * vocab))
                if score >= min_log_odds:
                    scored.append((-score, w))
            out[d] = [w for _, w in sorted(scored)[:top_k]]
        return cls(out)

    tokenize = staticmethod(tokenize)

    def _tokens(self, tokens: Sequence[str] | str) -> list[str]:
        return tokenize(tokens) if isinstance(tokens, str) else [t.lower() for t in tokens]

    def overlaps(self, tokens: Sequence[str] | str) -> list[int]:
        """|T ∩ l_i| for each domain i, in domain order."""
        t = set(self._tokens(tokens))
        return [len(t & self.words[d]) for d in self.domains]

    def tag(self, tokens: Sequence[str] | str) -> str:
        """Dom(T) = argmax_i |T ∩ l_i|; ties go to the first domain; no overlap -> "general"."""
        ov = self.overlaps(tokens)
        best = max(ov)
        return GENERAL if best == 0 else self.domains[ov.index(best)]

    def dss(self, tokens: Sequence[str] | str) -> float:
        """Domain Specific Score (1/m) Σ_i |T ∩ l_i| / n; 0.0 for no tokens."""
        toks = self._tokens(tokens)
        if not toks:
            return 0.0
        return sum(self.overlaps(toks)) / len(toks) / len(self.domains)

    def to_dict(self) -> dict[str, list[str]]:
        return {d: sorted(self.words[d]) for d in self.domains}

    def save(self, path: str | Path) -> Path:
        """Write {domain: [words]} as JSON (domain order kept)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> "DomainLexicons":
        """Read a JSON object {domain: [word, ...]} with errors naming the file and the fix."""
        p = Path(path)
        if not p.is_file():
            raise LexiconError(f"lexicon file not found: {p} (pass a JSON file like {{\"cooking\": [\"oven\"]}})")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise LexiconError(f"{p}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
        if not isinstance(data, dict):
            raise LexiconError(f"{p}: top level must be an object {{domain: [words]}}, got {type(data).__name__}")
        for domain, words in data.items():
            if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
                raise LexiconError(f"{p}: domain '{domain}' must map to a list of non-empty strings, got {words!r}")
        try:
            return cls(data)
        except LexiconError as err:
            raise LexiconError(f"{p}: {err}") from None


@functools.lru_cache(maxsize=8)
def default_lexicons(seed: int = 0, size: int = 4000, top_k: int = 60) -> DomainLexicons:
    """Lexicons of the synthetic DOMAINS, derived from `public_corpus(seed, size)` (cached)."""
    return DomainLexicons.from_labelled(public_corpus(seed, size), top_k=top_k, domains=DOMAINS)
