"""Data synthesis (Qin et al.): rewrite annotated questions into similar ones, filter by ROUGE-1.

Methods:
- "llm": the model rewrites each question k times (seeded sampling) from
  `PromptFormat.rewrite_prompt` (its chat template when it has one).
- "fallback": `lexical_fallback`, a seeded non-LLM rewriter (synonyms, word dropout, local
  swaps, filler prefixes/suffixes) for models too small to paraphrase.
- "auto": the LLM if it can paraphrase, else the fallback. Decided ONCE per base model by
  `probe_paraphrase` (fixed probe questions; at least half the rewrites must pass the filter),
  cached by DeviceRuntime; `last_stats.method` says which method ran.
Every rewrite keeps the original answer and must pass `rouge_filter` (LLM rewrites must also
still be questions: `filter_llm_rewrites`).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from fedasls.config import SynthesisSettings
from fedasls.pipeline.metrics import rouge1_f
from fedasls.lm.model import eval_mode
from fedasls.lm.prompts import PromptFormat, check_prompt_format

Method = Literal["auto", "llm", "fallback"]


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def rouge_filter(original: str, candidates: Iterable[str], rouge_min: float, rouge_max: float) -> list[str]:
    """Candidates with rouge_min <= ROUGE-1 F(candidate, original) <= rouge_max, deduplicated.

    Empty candidates, candidates identical to the original (ignoring case and spacing) and
    repeats are dropped; order is kept.
    """
    seen = {_normalize(original)}
    kept: list[str] = []
    for cand in candidates:
        cand = cand.strip()
        key = _normalize(cand)
        if not key or key in seen:
            continue
        if rouge_min <= rouge1_f(cand, original) <= rouge_max:
            kept.append(cand)
            seen.add(key)
    return kept


# --- non-LLM fallback -------------------------------------------------------------------

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "good": ("nice", "great"), "best": ("top", "ideal"), "way": ("method", "approach"),
    "ways": ("methods", "approaches"), "make": ("prepare", "create"), "help": ("assist", "support"),
    "quick": ("fast", "rapid"), "fast": ("quick",), "easy": ("simple",), "simple": ("easy",),
    "tips": ("advice", "pointers"), "recommend": ("suggest",), "suggest": ("recommend",),
    "improve": ("boost", "enhance"), "start": ("begin",), "begin": ("start",), "need": ("require",),
    "use": ("apply",), "get": ("obtain",), "find": ("locate",), "choose": ("pick", "select"),
    "learn": ("study",), "fix": ("repair",), "buy": ("purchase",), "big": ("large",),
    "small": ("little",), "often": ("frequently",), "show": ("explain",), "explain": ("describe",),
    "idea": ("suggestion",), "ideas": ("suggestions",), "problem": ("issue",), "keep": ("maintain",),
    "avoid": ("prevent",), "try": ("attempt",), "cheap": ("affordable", "inexpensive"),
    "healthy": ("nutritious",), "plan": ("schedule",), "important": ("essential",),
    "should": ("must",), "can": ("could",), "want": ("wish",), "think": ("believe",),
    "know": ("understand",), "right": ("correct",), "new": ("fresh",), "happy": ("glad",),
}
_PREFIXES = ("Quick question:", "Can you tell me", "I was wondering,", "Hey,", "Please help:")
_SUFFIXES = ("Thanks!", "Any tips?", "Please be brief.")


def _split(question: str) -> tuple[list[str], str]:
    """Words and trailing punctuation of a question."""
    m = re.match(r"^(.*?)([?.!]*)$", question.strip(), flags=re.S)
    assert m is not None  # the pattern matches every string
    return m.group(1).split(), m.group(2)


def _synonym(words: list[str], rng: random.Random) -> list[str] | None:
    spots = [i for i, w in enumerate(words) if w.lower() in _SYNONYMS]
    if not spots:
        return None
    i = rng.choice(spots)
    new = rng.choice(_SYNONYMS[words[i].lower()])
    if words[i][:1].isupper():
        new = new[:1].upper() + new[1:]
    return words[:i] + [new] + words[i + 1 :]


_DROPPABLE = frozenset({"the", "a", "an", "really", "just", "some", "very", "my", "please", "actually", "exactly"})


def _dropout(words: list[str], rng: random.Random) -> list[str] | None:
    """Drop one filler word (articles, intensifiers), keeping the content words."""
    spots = [i for i, w in enumerate(words) if i > 0 and w.lower() in _DROPPABLE]
    if len(words) < 4 or not spots:
        return None
    i = rng.choice(spots)
    return words[:i] + words[i + 1 :]


def _swap(words: list[str], rng: random.Random) -> list[str] | None:
    """Swap two adjacent words after the question opener (first two words)."""
    if len(words) < 5:
        return None
    i = rng.randrange(2, len(words) - 1)
    return words[:i] + [words[i + 1], words[i]] + words[i + 2 :]


def _prefix(words: list[str], rng: random.Random) -> list[str] | None:
    if not words:
        return None
    first = words[0]
    if first != "I" and not first[1:2].isupper():
        first = first[:1].lower() + first[1:]
    return rng.choice(_PREFIXES).split() + [first] + words[1:]


_WORD_OPS = (_synonym, _dropout, _swap, _prefix)


def lexical_fallback(question: str, k: int, seed: int, rouge_min: float = 0.3, rouge_max: float = 0.95) -> list[str]:
    """Up to k distinct non-LLM rewrites of `question` that pass `rouge_filter`.

    Seeded per (seed, question), so the result does not depend on the order of calls.
    Short questions may yield fewer than k.
    """
    rng = random.Random(f"{seed}:{question}")
    words, punct = _split(question)
    seen = {_normalize(question)}
    kept: list[str] = []
    for _ in range(40 * max(k, 1)):
        if len(kept) >= k:
            break
        out = words
        ops = rng.sample(_WORD_OPS, rng.choice((1, 2)))
        for op in sorted(ops, key=_WORD_OPS.index):  # the filler prefix always goes last
            out = op(out, rng) or out
        text = " ".join(out) + (punct or "?")
        if rng.random() < 0.2:
            text = f"{text} {rng.choice(_SUFFIXES)}"
        if _normalize(text) not in seen and rouge_min <= rouge1_f(text, question) <= rouge_max:
            kept.append(text)
            seen.add(_normalize(text))
    return kept


# --- LLM rewriting ------------------------------------------------------------------------


@torch.no_grad()
def llm_rewrites(
    model: Any,
    prompts: PromptFormat,
    question: str,
    k: int,
    seed: int,
    temperature: float = 0.9,
    top_p: float = 0.95,
    max_new_tokens: int | None = None,
) -> list[str]:
    """k sampled rewrites of `question` from `prompts.rewrite_prompt` (unfiltered, first line each).

    Sampling runs under a forked torch RNG seeded with `seed`: deterministic, and the global RNG
    is left untouched.
    """
    prompts = check_prompt_format(prompts)
    tokenizer = prompts.tokenizer
    enc = prompts.tokenize([prompts.rewrite_prompt(question)], return_tensors="pt")
    n_prompt = enc["input_ids"].shape[1]
    if max_new_tokens is None:
        max_new_tokens = min(48, 2 * len(tokenizer(question, add_special_tokens=False)["input_ids"]) + 8)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - n_prompt)
    if max_new_tokens <= 0:
        return []
    device = next(model.parameters()).device
    enc = {name: t.to(device) for name, t in enc.items()}
    with eval_mode(model):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=k,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=prompts.stop_ids,
            )
    texts = tokenizer.batch_decode(out[:, n_prompt:], skip_special_tokens=True)
    return [_clean_rewrite(t) for t in texts]


_LABEL = re.compile(r"^(?:question|rewrite|rewritten question|paraphrase|new question)\s*:\s*", flags=re.I)


def _clean_rewrite(text: str) -> str:
    """First line of a generated rewrite, without a leading label ("Question:") or wrapping quotes."""
    line = _LABEL.sub("", text.strip().split("\n", 1)[0].strip())
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line


def filter_llm_rewrites(question: str, candidates: Iterable[str], rouge_min: float, rouge_max: float) -> list[str]:
    """`rouge_filter` on LLM rewrites that are still questions when the original is one.

    A small model often answers instead of paraphrasing; such answers share words with the
    question and would pass the ROUGE-1 range alone.
    """
    if question.strip().endswith("?"):
        candidates = [c for c in candidates if c.strip().endswith("?")]
    return rouge_filter(question, candidates, rouge_min, rouge_max)


# --- "auto": can this model paraphrase? -------------------------------------------------------

# Fixed, domain-neutral probe questions: the decision depends on the model only, not on a device.
PROBE_QUESTIONS: tuple[str, ...] = (
    "How do I keep fresh basil from wilting so quickly?",
    "What is a good way to warm up before a long run?",
    "How can I spend less money on groceries every week?",
    "Which houseplants grow well in a room without much light?",
)
PROBE_SEED = 20_240_901


@dataclass(frozen=True)
class ParaphraseProbe:
    """How many of a model's rewrites of `PROBE_QUESTIONS` passed `filter_llm_rewrites`."""

    generated: int
    kept: int

    @property
    def pass_rate(self) -> float:
        return self.kept / self.generated if self.generated else 0.0

    @property
    def can_paraphrase(self) -> bool:
        """At least half the rewrites pass: the LLM is worth its generation time."""
        return self.generated > 0 and 2 * self.kept >= self.generated


def probe_paraphrase(model: Any, prompts: PromptFormat, settings: SynthesisSettings, k: int = 3) -> ParaphraseProbe:
    """Measure the model on the fixed probe questions (seeded): k rewrites each, ROUGE-filtered.

    Run it once per base model (DeviceRuntime caches it) with adapters disabled.
    """
    generated = kept = 0
    for i, question in enumerate(PROBE_QUESTIONS):
        raw = llm_rewrites(model, prompts, question, k, seed=PROBE_SEED + i)
        generated += len(raw)
        kept += len(filter_llm_rewrites(question, raw, settings.rouge_min, settings.rouge_max))
    return ParaphraseProbe(generated, kept)


@dataclass
class SynthesisStats:
    """What the last `synthesize` call did. `method` ("llm" or "fallback") produced the output."""

    method: str = "none"
    generated: int = 0
    kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Synthesizer:
    """Rewrites annotated (question, answer) pairs into k filtered similar questions each.

    `method` "auto" needs `can_paraphrase`, the model's `probe_paraphrase` verdict, decided once
    per base model by the caller (DeviceRuntime.can_paraphrase), never per call.
    """

    def __init__(
        self,
        method: Method = "auto",
        k: int = 3,
        rouge_min: float = 0.3,
        rouge_max: float = 0.95,
        seed: int = 0,
        can_paraphrase: bool | None = None,
        temperature: float = 0.9,
        top_p: float = 0.95,
        max_new_tokens: int | None = None,
    ) -> None:
        if method not in ("auto", "llm", "fallback"):
            raise ValueError(f"synthesis.method must be 'auto', 'llm' or 'fallback', got {method!r}")
        if k < 0:
            raise ValueError(f"synthesis.rewrites must be >= 0, got {k}")
        if not 0.0 <= rouge_min <= rouge_max <= 1.0:
            raise ValueError(
                f"synthesis needs 0 <= rouge_min <= rouge_max <= 1, got rouge_min={rouge_min}, rouge_max={rouge_max}"
            )
        if method == "auto" and can_paraphrase is None:
            raise ValueError(
                "Synthesizer('auto') needs can_paraphrase: measure the model once with probe_paraphrase "
                "(DeviceRuntime.can_paraphrase) and pass its verdict"
            )
        self.method, self.k, self.seed = method, k, seed
        self.rouge_min, self.rouge_max = rouge_min, rouge_max
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens = max_new_tokens  # None: about twice the question's length
        self.last_stats = SynthesisStats()
        # The method that runs: "auto" is resolved here, once, from the model's probe verdict.
        self.resolved: Literal["llm", "fallback"] = (
            ("llm" if can_paraphrase else "fallback") if method == "auto" else method
        )

    @classmethod
    def from_settings(
        cls, settings: SynthesisSettings, seed: int = 0, can_paraphrase: bool | None = None
    ) -> "Synthesizer":
        return cls(settings.method, settings.rewrites, settings.rouge_min, settings.rouge_max, seed, can_paraphrase)

    def _item_seed(self, question: str) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(question.encode("utf-8"))) % (2**63)

    def synthesize(self, model: Any, prompts: PromptFormat, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Filtered rewrites (question', answer) of the given pairs; the originals are not included.

        `model`/`prompts` are only used when the resolved method is "llm". See `last_stats`.
        """
        stats = SynthesisStats(method=self.resolved)
        self.last_stats = stats
        out: list[tuple[str, str]] = []
        if self.k == 0:
            return out
        for question, answer in pairs:
            if self.resolved == "llm":
                raw = llm_rewrites(
                    model, prompts, question, self.k, self._item_seed(question), self.temperature, self.top_p,
                    self.max_new_tokens,
                )
                rewrites = filter_llm_rewrites(question, raw, self.rouge_min, self.rouge_max)
                stats.generated += len(raw)
            else:
                rewrites = lexical_fallback(question, self.k, self.seed, self.rouge_min, self.rouge_max)
                stats.generated += self.k
            out.extend((r, answer) for r in rewrites)
        stats.kept = len(out)
        return out
