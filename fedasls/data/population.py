"""The synthetic device population: personas, domains and temporally correlated streams.

Everything is lazy and seeded per device: device `i` is generated from
`SeedSequence([seed, i, part])`, so it is identical across runs and independent of the
population size (a population of 1,000,000 devices costs nothing until a device is read).

A stream looks like real use of an assistant: repetitive low-value chatter, bursts of
near-duplicate questions close in time, rare valuable questions about the user's current
interests (which may drift mid-stream), and out-of-domain noise. Each interaction carries a
generic, style-neutral base-model `response` and the user's hidden `preferred` answer: the
same content in the user's style (length, formality, signature) mentioning relevant facts.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedasls.interaction import Interaction, InteractionKind, Persona, STREAM_EPOCH

DOMAINS_PATH = Path(__file__).with_name("domains.json")


def _load_domains() -> dict[str, dict[str, Any]]:
    """The domain data (fedasls/data/domains.json): per domain, topics (noun phrases), tips
    (imperative advice), question templates and personal facts as (first person, second person,
    advice, relevant domains)."""
    data = json.loads(DOMAINS_PATH.read_text(encoding="utf-8"))
    for domain in data.values():
        domain["facts"] = [(me, you, advice, tuple(domains)) for me, you, advice, domains in domain["facts"]]
    return data


_DOMAIN_DATA: dict[str, dict[str, Any]] = _load_domains()

DOMAINS: tuple[str, ...] = tuple(_DOMAIN_DATA)
"""The ground-truth interest domains (chatter is not a domain)."""

_CITIES = ("Lisbon", "Oslo", "Toronto", "Nairobi", "Melbourne", "Osaka", "Lima", "Dublin")
_GENERIC_FACTS = [(f"I live in {c}", f"you live in {c}", f"plan around the {c} climate", ("travel", "gardening"))
                  for c in _CITIES] + [
    ("I work night shifts", "you work night shifts", "fit this around your sleep", ("health", "fitness", "cooking", "parenting")),
    ("I am on a tight budget", "money is tight", "choose the cheapest option first", ("finance", "cooking", "travel")),
]
_FACTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    f[0]: (f[1], f[2], f[3]) for d in _DOMAIN_DATA.values() for f in d["facts"]
} | {f[0]: (f[1], f[2], f[3]) for f in _GENERIC_FACTS}

_SHARED_QUESTIONS = [
    "How should I get started with {topic}?",
    "What is the best way to handle {topic} during a busy week?",
    "Can you explain the difference between {topic} and {topic2}?",
    "Any tips for {topic} as a beginner?",
    "Why does my {topic} keep going wrong and how can I fix it?",
    "What mistakes do people usually make with {topic}?",
    "What should I know about {topic} before I start?",
    "Is it worth spending money on {topic}?",
    "Could you give me a simple plan for {topic} this month?",
]
# Generic answers: (intro with {topic} and {tip}, neutral connector before {tip2}).
_ANSWER_INTROS = [
    "For {topic}, {tip}.",
    "A good approach to {topic} is to {tip}.",
    "With {topic}, the key is to {tip}.",
    "To get {topic} right, {tip}.",
]
_NEUTRAL_CONNECTOR = "It also helps to"
_CONNECTORS = {"casual": "Also, try to", "formal": "Additionally, it is advisable to"}
_EXTRA = {"casual": "Oh, and {tip}!", "formal": "Finally, {tip}."}

# A fleet-wide trend (population.trend_share): a new app many users have adopted, which no public
# (pretraining) text mentions. Its sentence follows the intro (and fact) of the followers' domain answers. It is the signal
# a global adapter can carry to devices that never trained; style and facts are personal, and
# topic tips are public.
TREND_TIP = "check the weekly tips in the hearthly app"
_TREND_SENTENCE = "These days most people {tip}."

_NAMES = ("Sam", "Alex", "Priya", "Kenji", "Maria", "Tom", "Lena", "Omar", "Ana", "Yusuf")
_CLOSINGS = ("Cheers, {name}!", "Hope this helps, {name}!", "Best wishes, {name}.", "Take care, {name}.")
_OPENINGS = ("Quick take:", "Short answer:", "Here is my advice:", "In a nutshell:", "Good question!")

# Chatter: (question, generic response), most frequent first (drawn with Zipf-like weights).
_CHATTER = [
    ("hi", "Hello! How can I help you today?"),
    ("thanks", "You are welcome."),
    ("what's the weather today", "I cannot check live weather, but your weather app has the forecast."),
    ("ok", "Okay."),
    ("good morning", "Good morning! How can I help?"),
    ("thank you so much", "Happy to help."),
    ("how are you", "I am doing well, thanks for asking. How can I help?"),
    ("tell me a joke", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("what time is it", "Please check the clock on your device for the current time."),
    ("hello there", "Hi! What can I do for you?"),
    ("set a timer for ten minutes", "I cannot set timers, but your clock app can."),
    ("good night", "Good night! Sleep well."),
    ("never mind", "No problem."),
    ("are you there", "Yes, I am here. What do you need?"),
    ("cool", "Great."),
    ("bye", "Goodbye! Talk soon."),
    ("what's up", "Not much! What can I help you with?"),
    ("who are you", "I am your on-device assistant."),
    ("will it rain tomorrow", "I cannot check the forecast, but a weather app can tell you."),
    ("lol", "Glad that made you smile."),
]
_CHATTER_P = np.array([1.0 / (r + 1) for r in range(len(_CHATTER))])
_CHATTER_P /= _CHATTER_P.sum()

# Near-duplicate rewrites: phrase swaps and synonyms.
_SWAPS = [("How should I", "How do I"), ("What is", "What's"), ("How do I", "How can I"),
          ("Can you", "Could you"), ("Any tips", "Any advice"), ("Is it", "Is it really"),
          ("should", "could"), ("best", "easiest"), ("usually", "often"), ("simple", "quick"),
          ("beginner", "newbie"), ("start", "begin"), ("fix", "solve"), ("good", "great")]
_PREFIXES = ("Quick question: ", "Again, ", "Sorry, ", "Hmm, ")

# Event mix per step (a question event may be followed by a burst of near-duplicates).
_P_CHATTER, _P_VALUABLE, _P_NOISE = 0.53, 0.27, 0.20
_P_BURST = 0.45
_BURST_SIZES, _BURST_P = (1, 2, 3), (0.5, 0.35, 0.15)
_MAX_ANSWER_WORDS = 45


def domain_vocabulary(domain: str) -> frozenset[str]:
    """The distinctive content words of a domain (its topics and tips, minus short words)."""
    data = _DOMAIN_DATA[domain]
    words = " ".join(data["topics"] + data["tips"]).lower().split()
    return frozenset(w for w in words if len(w) > 3)


@runtime_checkable
class Population(Protocol):
    """Anything that serves device personas, streams and held-out future interactions."""

    @property
    def num_devices(self) -> int: ...

    def persona(self, i: int) -> Persona: ...

    def stream(self, i: int) -> list[Interaction]: ...

    def heldout(self, i: int) -> list[Interaction]: ...



@dataclass(frozen=True)
class _Content:
    """One generated question with its generic and preferred answers."""

    domain: str
    question: str
    response: str
    preferred: str


def _rng(seed: int, i: int, part: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, i, part]))


def _pick(rng: np.random.Generator, items: list | tuple) -> Any:
    return items[int(rng.integers(len(items)))]


def topic_tips(domain: str, topic: str) -> list[str]:
    """The three tips that answer questions about `topic`: fixed per topic (public knowledge the
    base model can learn), so what sets a user's preferred answer apart is style and facts."""
    tips = _DOMAIN_DATA[domain]["tips"]
    rng = np.random.default_rng(zlib.crc32(f"{domain}/{topic}".encode()))
    return [tips[k] for k in rng.choice(len(tips), size=3, replace=False)]


def _question(rng: np.random.Generator, domain: str) -> tuple[str, str, list[str]]:
    """(question, topic, the topic's three tips) for a domain."""
    data = _DOMAIN_DATA[domain]
    t1, t2 = rng.choice(len(data["topics"]), size=2, replace=False)
    topic, topic2 = data["topics"][t1], data["topics"][t2]
    template = _pick(rng, _SHARED_QUESTIONS + data["questions"])
    question = template.format(topic=topic, topic2=topic2)
    return question, topic, topic_tips(domain, topic)


def _generic_answer(rng: np.random.Generator, topic: str, tips: list[str]) -> tuple[str, str]:
    """(generic answer, its intro sentence) in the style-neutral base-model voice."""
    intro = _pick(rng, _ANSWER_INTROS).format(topic=topic, tip=tips[0])
    return f"{intro} {_NEUTRAL_CONNECTOR} {tips[1]}.", intro


def fact_domains(fact: str) -> tuple[str, ...]:
    """The domains in which a persona fact is relevant (its mention belongs in answers there)."""
    return _FACTS[fact][2]


def relevant_fact(persona: Persona, domain: str) -> str | None:
    """The persona's first fact relevant to `domain` (the one its preferred answers mention)."""
    return next((f for f in persona.facts if domain in _FACTS[f][2]), None)


def _stylize(body: list[str], persona: Persona) -> str:
    """Wrap answer sentences with the persona's opening or closing signature."""
    style = persona.style
    if style.get("signature"):
        if style.get("signature_at") == "start":
            body = [style["signature"], *body]
        else:
            body = [*body, style["signature"]]
    return " ".join(body)


def _preferred_answer(rng: np.random.Generator, persona: Persona, domain: str, intro: str, tips: list[str]) -> str:
    """The same content as the generic answer, in the persona's style, with a relevant fact."""
    formality = persona.style.get("formality", "casual")
    length = persona.style.get("length", "medium")
    parts = [intro]
    fact = relevant_fact(persona, domain)
    if fact is not None:
        you, advice, _ = _FACTS[fact]
        parts.append(f"Since {you}, {advice}.")
    if persona.style.get("trend"):
        parts.append(_TREND_SENTENCE.format(tip=TREND_TIP))
    optional = []
    if length in ("medium", "long"):
        optional.append(f"{_CONNECTORS[formality]} {tips[1]}.")
    if length == "long":
        optional.append(_EXTRA[formality].format(tip=tips[2]))
    for sentence in optional:  # keep answers short enough for a tiny model
        if len(_stylize(parts + [sentence], persona).split()) <= _MAX_ANSWER_WORDS:
            parts.append(sentence)
    return _stylize(parts, persona)


def _content(rng: np.random.Generator, persona: Persona, domain: str) -> _Content:
    question, topic, tips = _question(rng, domain)
    response, intro = _generic_answer(rng, topic, tips)
    preferred = _preferred_answer(rng, persona, domain, intro, tips)
    return _Content(domain, question, response, preferred)


def _chatter(rng: np.random.Generator, persona: Persona) -> _Content:
    question, response = _CHATTER[int(rng.choice(len(_CHATTER), p=_CHATTER_P))]
    return _Content("chatter", question, response, _stylize([response], persona))


def near_duplicate(rng: np.random.Generator, question: str) -> str:
    """A small rewrite of a question (phrase swap, synonym, prefix or dropped word)."""
    for _ in range(8):
        op = int(rng.integers(3))
        if op == 0:
            options = [(a, b) for a, b in _SWAPS if a in question]
            if options:
                a, b = _pick(rng, options)
                out = question.replace(a, b, 1)
            else:
                continue
        elif op == 1:
            out = _pick(rng, _PREFIXES) + question[0].lower() + question[1:]
        else:
            words = question.split()
            if len(words) < 7:
                continue
            k = int(rng.integers(1, len(words) - 1))
            out = " ".join(words[:k] + words[k + 1:])
        if out != question:
            return out
    return question.rstrip("?") + " please?"


def _current_interests(persona: Persona, index: int) -> tuple[str, ...]:
    if persona.drift_at is not None and index >= persona.drift_at:
        return persona.drift_to
    return persona.interests


def final_interests(persona: Persona) -> tuple[str, ...]:
    """The persona's interests at the end of its stream (after any drift)."""
    return persona.drift_to if persona.drift_at is not None else persona.interests


class SyntheticPopulation:
    """A lazy, seeded population of `num_devices` simulated users.

    Nothing is materialized: `persona(i)`, `stream(i)` and `heldout(i)` are generated on
    demand from `SeedSequence([seed, i, part])`, identical across runs and independent of
    `num_devices`.
    """

    def __init__(self, num_devices: int, seed: int = 0, stream_length: int = 160, heldout: int = 8,
                 drift_fraction: float = 0.25, trend_share: float = 0.0) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1 (got {num_devices})")
        if stream_length < 1 or heldout < 0:
            raise ValueError(f"stream_length must be >= 1 and heldout >= 0 (got {stream_length}, {heldout})")
        if not 0.0 <= drift_fraction <= 1.0:
            raise ValueError(f"drift_fraction must be in [0, 1] (got {drift_fraction})")
        if not 0.0 <= trend_share <= 1.0:
            raise ValueError(f"trend_share must be in [0, 1] (got {trend_share})")
        self.num_devices = num_devices
        self.trend_share = trend_share
        self.seed = seed
        self.stream_length = stream_length
        self.num_heldout = heldout
        self.drift_fraction = drift_fraction

    def _check(self, i: int) -> None:
        if not 0 <= i < self.num_devices:
            raise IndexError(f"device id {i} out of range: this population has devices 0..{self.num_devices - 1}")

    def persona(self, i: int) -> Persona:
        """Device i's hidden traits: interests, style, facts and optional drift."""
        self._check(i)
        rng = _rng(self.seed, i, 0)
        k = int(rng.integers(1, 4))
        interests = tuple(DOMAINS[j] for j in rng.choice(len(DOMAINS), size=k, replace=False))
        name = _pick(rng, _NAMES)
        at_start = bool(rng.random() < 0.5)
        style = {
            "length": _pick(rng, ("short", "medium", "long")),
            "formality": _pick(rng, ("casual", "formal")),
            "signature": (_pick(rng, _OPENINGS) if at_start else _pick(rng, _CLOSINGS).format(name=name)),
            "signature_at": "start" if at_start else "end",
            "name": name,
        }
        drift_at, drift_to = None, ()
        if rng.random() < self.drift_fraction:
            drift_at = int(self.stream_length * rng.uniform(0.35, 0.65))
            others = [d for d in DOMAINS if d not in interests]
            m = int(rng.integers(1, 3))
            drift_to = tuple(others[j] for j in rng.choice(len(others), size=m, replace=False))
        own = [f[0] for d in interests for f in _DOMAIN_DATA[d]["facts"]]
        extra = [f[0] for d in drift_to for f in _DOMAIN_DATA[d]["facts"]]
        extra += [_pick(rng, _GENERIC_FACTS[: len(_CITIES)])[0]] + [f[0] for f in _GENERIC_FACTS[len(_CITIES):]]
        n_facts = int(rng.integers(2, 5))
        first = _pick(rng, own)
        rest = [f for f in own + extra if f != first]
        chosen = [first] + [rest[j] for j in rng.choice(len(rest), size=n_facts - 1, replace=False)]
        # Its own random stream (part 3), so a population without the trend is unchanged.
        if self.trend_share and _rng(self.seed, i, 3).random() < self.trend_share:
            style["trend"] = True
        return Persona(device_id=i, interests=interests, style=style, facts=tuple(chosen),
                       drift_at=drift_at, drift_to=drift_to)

    def stream(self, i: int) -> list[Interaction]:
        """Device i's `stream_length` timestamped interactions, oldest first."""
        persona = self.persona(i)
        rng = _rng(self.seed, i, 1)
        t = STREAM_EPOCH + rng.uniform(0, 7 * 86400)
        out: list[Interaction] = []

        def emit(c: _Content, kind: InteractionKind, gap: float) -> None:
            nonlocal t
            t += gap
            out.append(Interaction(i, len(out), float(t), c.question, c.response, c.preferred, c.domain, kind))

        while len(out) < self.stream_length:
            gap = float(rng.exponential(6 * 3600) + 1800) if rng.random() < 0.12 else float(rng.exponential(120) + 10)
            interests = _current_interests(persona, len(out))
            u = rng.random()
            if u < _P_CHATTER:
                emit(_chatter(rng, persona), "chatter", gap)
                continue
            if u < _P_CHATTER + _P_VALUABLE:
                kind, domain = "valuable", _pick(rng, interests)
            else:
                kind, domain = "noise", _pick(rng, [d for d in DOMAINS if d not in interests])
            content = _content(rng, persona, domain)
            emit(content, kind, gap)
            if rng.random() < _P_BURST:
                for _ in range(int(rng.choice(_BURST_SIZES, p=_BURST_P))):
                    if len(out) >= self.stream_length:
                        break
                    dup = _Content(domain, near_duplicate(rng, content.question), content.response, content.preferred)
                    emit(dup, "duplicate", float(rng.uniform(5, 90)))
        return out

    def heldout(self, i: int) -> list[Interaction]:
        """Device i's future valuable interactions in its final interests, after the stream."""
        stream = self.stream(i)
        persona = self.persona(i)
        seen = {x.question for x in stream}
        rng = _rng(self.seed, i, 2)
        t = stream[-1].timestamp if stream else STREAM_EPOCH
        interests = final_interests(persona)
        out: list[Interaction] = []
        while len(out) < self.num_heldout:
            content = _content(rng, persona, _pick(rng, interests))
            if content.question in seen:
                continue
            seen.add(content.question)
            t += float(rng.exponential(3600) + 60)
            out.append(Interaction(i, self.stream_length + len(out), t, content.question, content.response,
                                   content.preferred, content.domain, "valuable"))
        return out


def public_corpus(seed: int, size: int) -> list[tuple[str, str]]:
    """`size` deterministic (domain, text) public, non-user texts over all domains plus chatter.

    Mostly "Question: ...\\nAnswer: ..." pairs shaped like the stream's generic answers,
    some plain advice sentences and casual/formal answer variants (no personas, no facts).
    """
    if size < 0:
        raise ValueError(f"size must be >= 0 (got {size})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, 7]))
    labels = list(DOMAINS) + ["chatter"]
    p = np.array([1.0] * len(DOMAINS) + [1.5])
    p /= p.sum()
    out: list[tuple[str, str]] = []
    for _ in range(size):
        domain = labels[int(rng.choice(len(labels), p=p))]
        if domain == "chatter":
            q, a = _CHATTER[int(rng.choice(len(_CHATTER), p=_CHATTER_P))]
            out.append(("chatter", f"Question: {q}\nAnswer: {a}"))
            continue
        question, topic, tips = _question(rng, domain)
        answer, intro = _generic_answer(rng, topic, tips)
        u = rng.random()
        if u < 0.7:
            text = f"Question: {question}\nAnswer: {answer}"
        elif u < 0.85:
            formality = _pick(rng, ("casual", "formal"))
            text = f"Question: {question}\nAnswer: {intro} {_CONNECTORS[formality]} {tips[1]}."
        else:
            text = " ".join(t[0].upper() + t[1:] + "." for t in tips)
        out.append((domain, text))
    return out
