"""On-device data selection: a byte-bounded buffer and the policies that fill it.

Every incoming dialogue set (question + the model's response) is tagged with a domain and
scored with the three self-supervised metrics of Qin et al. (DAC 2024):

- EOE, entropy of embedding: the Shannon entropy (natural log) of a 100-bin histogram of
  the embedding's values, divided by ``log2(n_tokens + 1)`` as in the authors' code (the
  paper writes ``log n``; ``+ 1`` keeps one-token texts finite, base 2 only rescales).
  ``n_tokens`` is the number of lexicon word tokens of the text unless the caller passes
  the LM token count.
- DSS, domain specific score: ``DomainLexicons.dss`` on the same tokens.
- IDD, in-domain dissimilarity: ``1 - mean cosine similarity`` between the text's
  embedding and the buffered items of its dominant domain (1.0 if that domain is empty).
  For buffered items it is recomputed leave-one-out inside their domain whenever the
  domain changes (one small Gram matrix per changed domain, cached).

Policies share one interface, ``SelectionPolicy.offer(buffer, item) -> bool``. While the
buffer has room every policy admits. When it is full:

- ``full`` (our combination rule; the paper does not publish one): the value of an item is
  the product ``EOE * DSS * IDD``, times the interest factor
  ``(1 - profile_weight) + profile_weight * w_d / max(w)`` of its domain ``d``, where ``w``
  is the user profile's recent domain histogram (``profile_weight`` = 1 by default; no
  factor without a profile or before the profile has seen a tagged interaction). The
  candidate evicts the lowest-valued buffered items (several if one frees too few bytes)
  if, and only if, they are worth strictly less than the candidate; otherwise it is
  rejected.
  Why a product: all three metrics are >= 0 and "higher is better", and a product is
  scale-free (rescaling one metric rescales every value alike, so no normalisation is
  needed) and acts as an AND: text without a domain word (DSS = 0, chatter) or a copy of
  buffered text (IDD ~ 0) is worth ~0 however high its other scores. A mean of
  rank- or min-max-normalised metrics was tried first and buffered mostly chatter: EOE
  divides by log2(n_tokens + 1), so one-word chatter has the highest EOE, and chatter
  (tag "general") is dissimilar to everything, so two of three metrics out-voted DSS.
  Measured on SyntheticPopulation streams (16 KB buffer, share of buffered "valuable"
  items at the end of 160-item streams, tiny-LM / MiniLM / bag-of-words embeddings):
  product 0.34 / 0.27 / 0.34 without a profile and 0.43 / 0.58 / 0.54 with it; rank-mean
  0.04 / 0.16 / 0.07; DSS alone 0.32 / 0.31 / 0.31; FIFO 0.21 / 0.22 / 0.19. (MiniLM's
  384-d float32 embeddings leave room for only ~9 items in 16 KB.) Global eviction was
  as good or slightly better than first evicting from the candidate's own domain (the
  paper's per-domain lists), so the rule is global.
- ``eoe`` / ``dss`` / ``idd``: the same rule on one raw metric and no profile (ablation).
- ``random``: always admit, evict uniformly random items (seeded).
- ``fifo``: always admit, evict the oldest items.
- ``kcenter``: greedy core-set (Sener & Savarese 2017) on unit-normalised embeddings
  (Euclidean, i.e. monotone in cosine distance): repeatedly drop, from buffer + candidate,
  the point closest to its nearest neighbour (ties: the one whose second-nearest
  neighbour is closer; the candidate first). If the candidate is dropped it is rejected.
- ``reservoir``: reservoir sampling (Algorithm R) over the stream, seeded.

Everything is deterministic given the seed; score ties evict the older item first.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Protocol, get_args

import numpy as np

from fedasls.config import SelectionPolicyName
from fedasls.interaction import Interaction

EOE_BINS = 100
METRICS = ("eoe", "dss", "idd")
POLICY_NAMES: tuple[str, ...] = get_args(SelectionPolicyName)  # the setting's Literal is the one list


class Lexicons(Protocol):
    """What selection needs from `fedasls.data.lexicon.DomainLexicons`."""

    domains: tuple[str, ...]

    def tokenize(self, text: str) -> list[str]: ...
    def tag(self, tokens: list[str]) -> str: ...
    def dss(self, tokens: list[str]) -> float: ...


class InterestProfile(Protocol):
    """What the `full` policy needs from `fedasls.pipeline.profile.UserProfile`."""

    def interest_weights(self) -> dict[str, float]: ...


# ----------------------------------------------------------------------------- metrics


def item_text(interaction: Interaction) -> str:
    """The text that is tagged, scored, embedded and stored: question + model response."""
    return f"{interaction.question}\n{interaction.response}"


def histogram_entropy(values: np.ndarray, bins: int = EOE_BINS) -> float:
    """Natural-log Shannon entropy of a `bins`-bin histogram of `values` (0 if constant)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("histogram_entropy: empty embedding (expected a non-empty vector)")
    if not np.all(np.isfinite(v)):
        raise ValueError("histogram_entropy: embedding has NaN/inf values; check the embedder output")
    counts, _ = np.histogram(v, bins=bins)
    p = counts[counts > 0] / v.size
    return float(-(p * np.log(p)).sum())


def eoe(embedding: np.ndarray, n_tokens: int) -> float:
    """Entropy of embedding: histogram entropy / log2(n_tokens + 1) (n_tokens >= 1 enforced)."""
    return histogram_entropy(embedding) / math.log2(max(int(n_tokens), 1) + 1)


def unit(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def idd(embedding: np.ndarray, domain_embeddings: np.ndarray) -> float:
    """In-domain dissimilarity: 1 - mean cosine similarity to the domain's buffered items."""
    others = np.asarray(domain_embeddings, dtype=np.float32)
    if others.size == 0:
        return 1.0
    return float(1.0 - (unit(others.reshape(len(others), -1)) @ unit(embedding)).mean())


def _leave_one_out_idd(units: np.ndarray) -> np.ndarray:
    """IDD of every row against the other rows (1.0 for a lone row)."""
    k = len(units)
    if k < 2:
        return np.ones(k)
    gram = units @ units.T
    return 1.0 - (gram.sum(1) - np.diag(gram)) / (k - 1)


# ----------------------------------------------------------------------------- buffer


@dataclass(eq=False)
class BufferItem:
    """A scored dialogue set. `nbytes` counts what a device stores for it: the UTF-8
    question + response and the float32 embedding. (`preferred`, `domain`, `kind` of the
    interaction are simulation ground truth carried along, never stored on a real device.)"""

    interaction: Interaction
    embedding: np.ndarray
    domain: str
    eoe: float
    dss: float
    idd: float = 1.0  # candidate: vs the buffer at scoring time; buffered: leave-one-out, kept current
    seq: int = 0  # arrival number in the stream
    nbytes: int = field(init=False)
    unit: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.embedding = np.ascontiguousarray(self.embedding, dtype=np.float32).ravel()
        self.unit = unit(self.embedding)
        text = (self.interaction.question + self.interaction.response).encode("utf-8")
        self.nbytes = len(text) + self.embedding.nbytes

    @property
    def scores(self) -> dict[str, float]:
        return {"eoe": self.eoe, "dss": self.dss, "idd": self.idd}

    def to_state(self) -> dict[str, Any]:
        return {
            "interaction": self.interaction.to_dict(),
            "embedding": self.embedding.tolist(),
            "domain": self.domain,
            "eoe": self.eoe,
            "dss": self.dss,
            "seq": self.seq,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "BufferItem":
        try:
            return cls(
                interaction=Interaction.from_dict(state["interaction"]),
                embedding=np.asarray(state["embedding"], dtype=np.float32),
                domain=str(state["domain"]),
                eoe=float(state["eoe"]),
                dss=float(state["dss"]),
                seq=int(state["seq"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"corrupt buffer item state ({err!r}); expected keys {sorted(cls._STATE_KEYS)}") from None

    _STATE_KEYS: ClassVar[frozenset[str]] = frozenset({"interaction", "embedding", "domain", "eoe", "dss", "seq"})


class Buffer:
    """Per-domain lists of items whose total `nbytes` never exceeds `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 1:
            raise ValueError(f"Buffer: budget_bytes must be >= 1 (got {budget_bytes}); set selection.buffer_bytes")
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self._domains: dict[str, list[BufferItem]] = {}
        self._units: dict[str, np.ndarray] = {}
        self._items: list[BufferItem] | None = None

    # --- views
    def __len__(self) -> int:
        return sum(len(v) for v in self._domains.values())

    def __iter__(self) -> Iterator[BufferItem]:
        return iter(self.items())

    def items(self) -> list[BufferItem]:
        """All items, oldest first."""
        if self._items is None:
            self._items = sorted((it for v in self._domains.values() for it in v), key=lambda it: it.seq)
        return self._items

    def domain_items(self, domain: str) -> list[BufferItem]:
        return list(self._domains.get(domain, ()))

    def domain_counts(self) -> dict[str, int]:
        return {d: len(v) for d, v in self._domains.items() if v}

    def is_full(self) -> bool:
        """True when an item of the buffered items' mean size would not fit without an eviction."""
        n = len(self)
        return n > 0 and self.used_bytes + self.used_bytes / n > self.budget_bytes

    def fits(self, item: BufferItem, freed: int = 0) -> bool:
        return self.used_bytes - freed + item.nbytes <= self.budget_bytes

    def candidate_idd(self, item: BufferItem) -> float:
        """IDD of a not-yet-buffered item against its domain's buffered items."""
        units = self._units.get(item.domain)
        if units is None or len(units) == 0:
            return 1.0
        return float(1.0 - (units @ item.unit).mean())

    # --- changes
    def add(self, item: BufferItem) -> None:
        if not self.fits(item):
            raise ValueError(
                f"Buffer.add: item of {item.nbytes} B does not fit ({self.used_bytes}/{self.budget_bytes} B used); "
                "evict first (use a SelectionPolicy)"
            )
        self._domains.setdefault(item.domain, []).append(item)
        self.used_bytes += item.nbytes
        self._refresh(item.domain)

    def remove(self, item: BufferItem) -> None:
        lst = self._domains.get(item.domain, [])
        for i, other in enumerate(lst):
            if other is item:
                del lst[i]
                self.used_bytes -= item.nbytes
                self._refresh(item.domain)
                return
        raise KeyError(f"Buffer.remove: item seq={item.seq} is not in the buffer")

    def _refresh(self, domain: str) -> None:
        """Recompute the domain's unit matrix and its items' leave-one-out IDD."""
        self._items = None
        lst = self._domains.get(domain, [])
        if not lst:
            self._domains.pop(domain, None)
            self._units.pop(domain, None)
            return
        units = np.stack([it.unit for it in lst])
        self._units[domain] = units
        for it, v in zip(lst, _leave_one_out_idd(units)):
            it.idd = float(v)

    # --- state
    def to_state(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "items": [it.to_state() for it in self.items()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Buffer":
        if not isinstance(state, dict) or "budget_bytes" not in state or "items" not in state:
            raise ValueError("corrupt buffer state: expected a dict with 'budget_bytes' and 'items'")
        buf = cls(int(state["budget_bytes"]))
        for s in state["items"]:
            buf.add(BufferItem.from_state(s))
        return buf


# ----------------------------------------------------------------------------- policies


def _take_until_fits(buffer: Buffer, item: BufferItem, ordered: list[BufferItem]) -> list[BufferItem] | None:
    """Shortest prefix of `ordered` whose eviction makes `item` fit, or None."""
    freed = 0
    for i, victim in enumerate(ordered):
        freed += victim.nbytes
        if buffer.fits(item, freed):
            return ordered[: i + 1]
    return None


class SelectionPolicy(ABC):
    """Decides whether an incoming item enters a full buffer and what it evicts."""

    name: ClassVar[str]

    def offer(self, buffer: Buffer, item: BufferItem) -> bool:
        """Admit `item` (evicting as needed) and return True, or leave the buffer unchanged."""
        self._seen(buffer, item)
        if item.nbytes > buffer.budget_bytes:
            return False
        if buffer.fits(item):
            buffer.add(item)
            return True
        victims = self._victims(buffer, item)
        if victims is None:
            return False
        for v in victims:
            buffer.remove(v)
        buffer.add(item)
        return True

    def _seen(self, buffer: Buffer, item: BufferItem) -> None:
        """Hook called for every offered item (stream statistics)."""

    @abstractmethod
    def _victims(self, buffer: Buffer, item: BufferItem) -> list[BufferItem] | None:
        """Items to evict so that `item` fits, or None to reject it."""

    def to_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class FifoPolicy(SelectionPolicy):
    name = "fifo"

    def _victims(self, buffer: Buffer, item: BufferItem) -> list[BufferItem] | None:
        return _take_until_fits(buffer, item, buffer.items())


class _SeededPolicy(SelectionPolicy):
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def to_state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]


class RandomPolicy(_SeededPolicy):
    name = "random"

    def _victims(self, buffer: Buffer, item: BufferItem) -> list[BufferItem] | None:
        items = buffer.items()
        return _take_until_fits(buffer, item, [items[i] for i in self.rng.permutation(len(items))])


class ReservoirPolicy(_SeededPolicy):
    """Algorithm R: the n-th item enters a full buffer with probability k/n."""

    name = "reservoir"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.n_seen = 0

    def _seen(self, buffer: Buffer, item: BufferItem) -> None:
        self.n_seen += 1

    def _victims(self, buffer: Buffer, item: BufferItem) -> list[BufferItem] | None:
        items = buffer.items()
        j = int(self.rng.integers(self.n_seen))
        if j >= len(items):
            return None
        rest = [items[i] for i in self.rng.permutation(len(items)) if i != j]
        return _take_until_fits(buffer, item, [items[j], *rest])

    def to_state(self) -> dict[str, Any]:
        return {**super().to_state(), "n_seen": self.n_seen}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.n_seen = int(state.get("n_seen", 0))


class KCenterPolicy(SelectionPolicy):
    """Greedy k-center core-set: keep the points that are far from each other."""

    name = "kcenter"

    def _victims(self, buffer: Buffer, item: BufferItem) -> list[BufferItem] | None:
        items = buffer.items()
        k = len(items)
        units = np.vstack([np.stack([it.unit for it in items]), item.unit[None, :]])
        dist = np.sqrt(np.maximum(2.0 - 2.0 * (units @ units.T), 0.0))
        np.fill_diagonal(dist, np.inf)
        alive = np.ones(k + 1, dtype=bool)
        victims: list[BufferItem] = []
        freed = 0
        while True:
            d = dist[np.ix_(alive, alive)]
            idx = np.flatnonzero(alive)
            if len(idx) < 3:
                nn, nn2 = d.min(1), np.zeros(len(idx))
            else:
                part = np.partition(d, 1, axis=1)
                nn, nn2 = part[:, 0], part[:, 1]
            is_cand = (idx == k).astype(np.int8)
            # lexsort: last key primary -> smallest nn, then smallest nn2, candidate first
            pick = idx[np.lexsort((idx, -is_cand, nn2, nn))[0]]
            if pick == k:
                return None
            alive[pick] = False
            victims.append(items[pick])
            freed += items[pick].nbytes
            if buffer.fits(item, freed):
                return victims


class ScorePolicy(SelectionPolicy):
    """Replacement by one raw metric: the candidate evicts the lowest-scoring items."""

    def __init__(self, metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric '{metric}': choose one of {METRICS}")
        self.metric = metric
        self.name = metric  # type: ignore[misc]

    def values(self, buffer: Buffer, item: BufferItem) -> tuple[np.ndarray, float]:
        """(score of each buffered item in `buffer.items()` order, score of the candidate)."""
        items = buffer.items()
        cand = buffer.candidate_idd(item) if self.metric == "idd" else getattr(item, self.metric)
        return np.array([getattr(it, self.metric) for it in items], dtype=np.float64), float(cand)

    def _victims(self, buffer: Buffer, item: BufferItem) -> list[BufferItem] | None:
        items = buffer.items()
        scores, cand = self.values(buffer, item)
        order = np.argsort(scores, kind="stable")  # items are oldest first: ties evict the older
        return _take_until_fits(buffer, item, [items[i] for i in order if scores[i] < cand])


class FullPolicy(ScorePolicy):
    """EOE x DSS x IDD, times the profile's interest factor for the item's domain."""

    name = "full"

    def __init__(self, profile: InterestProfile | None = None, profile_weight: float = 1.0) -> None:
        if not 0.0 <= profile_weight <= 1.0:
            raise ValueError(f"FullPolicy: profile_weight must be in [0, 1] (got {profile_weight})")
        self.metric = "full"
        self.profile = profile
        self.profile_weight = profile_weight

    def interest_factor(self, domains: list[str]) -> np.ndarray:
        """(1 - lambda) + lambda * w_d / max(w) per domain; ones without a profile or history."""
        ones = np.ones(len(domains))
        if self.profile is None or self.profile_weight == 0:
            return ones
        weights = self.profile.interest_weights()
        top = max(weights.values(), default=0.0)
        if top <= 0:
            return ones
        w = np.array([weights.get(d, 0.0) for d in domains]) / top
        return (1.0 - self.profile_weight) + self.profile_weight * w

    def values(self, buffer: Buffer, item: BufferItem) -> tuple[np.ndarray, float]:
        items = buffer.items()
        raw = np.empty((len(items) + 1, 3))
        raw[:-1, 0] = [it.eoe for it in items]
        raw[:-1, 1] = [it.dss for it in items]
        raw[:-1, 2] = [it.idd for it in items]
        raw[-1] = (item.eoe, item.dss, buffer.candidate_idd(item))
        combined = np.maximum(raw, 0.0).prod(1) * self.interest_factor([it.domain for it in items] + [item.domain])
        return combined[:-1], float(combined[-1])


def make_policy(name: str, lexicons: Lexicons | None = None, seed: int = 0, profile: InterestProfile | None = None,
                profile_weight: float = 1.0) -> SelectionPolicy:
    """Build the policy named by `selection.policy` (`profile` and `profile_weight` are used by "full" only)."""
    if name == "full":
        return FullPolicy(profile, profile_weight)
    if name in METRICS:
        return ScorePolicy(name)
    if name == "fifo":
        return FifoPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "reservoir":
        return ReservoirPolicy(seed)
    if name == "kcenter":
        return KCenterPolicy()
    raise ValueError(f"unknown selection policy '{name}' (selection.policy): choose one of {POLICY_NAMES}")


# ----------------------------------------------------------------------------- selector


class Selector:
    """Buffer + policy + lexicons for one device; counts changes since the last adaptation."""

    def __init__(
        self,
        lexicons: Lexicons,
        policy: SelectionPolicy,
        budget_bytes: int,
        buffer: Buffer | None = None,
    ) -> None:
        self.lexicons = lexicons
        self.policy = policy
        self.buffer = buffer if buffer is not None else Buffer(budget_bytes)
        self.seq = 0  # items observed so far
        self.changes_since_adaptation = 0  # admissions since mark_adapted()
        self.adapted_at_seq = 0

    @classmethod
    def from_settings(cls, settings: Any, lexicons: Lexicons, seed: int = 0, profile: InterestProfile | None = None) -> "Selector":
        """From a `SelectionSettings` (policy, profile_weight, buffer_bytes)."""
        policy = make_policy(settings.policy, lexicons, seed, profile, settings.profile_weight)
        return cls(lexicons, policy, settings.buffer_bytes)

    def score(self, interaction: Interaction, embedding: np.ndarray, n_tokens: int | None = None) -> BufferItem:
        """Tag and score one interaction (IDD against the current buffer); does not offer it."""
        tokens = self.lexicons.tokenize(item_text(interaction))
        domain = self.lexicons.tag(tokens)
        item = BufferItem(
            interaction=interaction,
            embedding=embedding,
            domain=domain,
            eoe=eoe(embedding, len(tokens) if n_tokens is None else n_tokens),
            dss=float(self.lexicons.dss(tokens)),
            seq=self.seq,
        )
        item.idd = self.buffer.candidate_idd(item)
        return item

    def offer(self, item: BufferItem) -> bool:
        """Offer a scored item (from `score`) to the buffer; True if it entered."""
        self.seq += 1
        admitted = self.policy.offer(self.buffer, item)
        if admitted:
            self.changes_since_adaptation += 1
        return admitted

    def observe(self, interaction: Interaction, embedding: np.ndarray, n_tokens: int | None = None) -> bool:
        """Score and offer one interaction; True if it entered the buffer."""
        return self.offer(self.score(interaction, embedding, n_tokens))

    def new_items(self) -> list[BufferItem]:
        """Buffered items that arrived after the last adaptation."""
        return [it for it in self.buffer.items() if it.seq >= self.adapted_at_seq]

    def mark_adapted(self) -> None:
        self.changes_since_adaptation = 0
        self.adapted_at_seq = self.seq

    def interactions(self) -> list[Interaction]:
        return [it.interaction for it in self.buffer.items()]

    def to_state(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "policy_state": self.policy.to_state(),
            "seq": self.seq,
            "changes_since_adaptation": self.changes_since_adaptation,
            "adapted_at_seq": self.adapted_at_seq,
            "buffer": self.buffer.to_state(),
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], lexicons: Lexicons, seed: int = 0, profile: InterestProfile | None = None,
        profile_weight: float = 1.0,
    ) -> "Selector":
        try:
            policy = make_policy(state["policy"], lexicons, seed, profile, profile_weight)
            policy.load_state(state["policy_state"])
            buffer = Buffer.from_state(state["buffer"])
            sel = cls(lexicons, policy, buffer.budget_bytes, buffer)
            sel.seq = int(state["seq"])
            sel.changes_since_adaptation = int(state["changes_since_adaptation"])
            sel.adapted_at_seq = int(state["adapted_at_seq"])
        except KeyError as err:
            raise ValueError(f"corrupt selector state: missing key {err}; rebuild the device state") from None
        return sel
