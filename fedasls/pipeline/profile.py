"""The ASLS user profiling layer: a small, serializable summary of one user's stream.

Updated once per interaction (`observe`) and per implicit feedback signal (`record_feedback`):

- interests: a streaming embedding centroid (EMA of unit-normalised embeddings) and a domain
  histogram from the device's lexicon tags, kept both as lifetime counts and as a decayed
  ("recent") histogram with the same EMA rate, so that drift is visible quickly. Both are
  updated from domain-tagged interactions only: chatter (tag "general") says nothing about
  interests and would only dilute the centroid;
- style: mean question length in words and the share of chatter-like short messages;
- feedback quality: counts of accept / edit / regenerate and the accept rate.

Drift compares the profile now with the snapshot taken at the last adaptation
(`mark_adapted`): ``drift = max(cosine distance of the centroids, total-variation distance
of the recent domain histograms)``. Both parts lie in [0, 1] in practice (cosine distance
can reach 2), either one alone can trigger re-tuning, and the max keeps `drift_trigger` on
one interpretable scale. Before the first adaptation drift is 0 (nothing to compare with);
re-tuning is then triggered by new buffered items only. Noise level measured on
SyntheticPopulation streams (ema 0.05, bag-of-words embeddings): users whose interests do
not change reach drift ~0.45 on average at the worst point of their stream (the domain
histogram of a ~20-item window is noisy), drifting users ~0.58 forty interactions after
the change; a `drift_trigger` near 0.5 separates them better than 0.35.

Only `Interaction.question` is read; `domain` / `kind` of an interaction are ground truth
and never used here.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from fedasls.interaction import Interaction
from fedasls.data.lexicon import GENERAL

FeedbackSignal = Literal["accept", "edit", "regenerate"]
FEEDBACK_SIGNALS: tuple[str, ...] = ("accept", "edit", "regenerate")


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(1.0 - np.dot(a, b) / (na * nb))


class UserProfile:
    """Streaming interests, style and feedback statistics of one user, plus drift."""

    def __init__(self, domains: Sequence[str], ema: float = 0.05, chatter_max_words: int = 5) -> None:
        if not domains:
            raise ValueError("UserProfile: domains must be non-empty (pass DomainLexicons.domains)")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"UserProfile: ema must be in (0, 1] (got {ema})")
        self.domains = tuple(domains)
        self.ema = float(ema)
        self.chatter_max_words = int(chatter_max_words)
        self.n_observed = 0
        self.n_tagged = 0  # interactions with a lexicon domain (not "general")
        self.centroid: np.ndarray | None = None
        self.domain_counts = {d: 0 for d in self.domains}
        self.recent_domains = np.zeros(len(self.domains))  # decayed histogram, sums to 1 once observed
        self.mean_question_words = 0.0
        self.chatter_share = 0.0
        self.feedback = {s: 0 for s in FEEDBACK_SIGNALS}
        self.adapted_centroid: np.ndarray | None = None
        self.adapted_domains: np.ndarray | None = None
        self.n_adaptations = 0

    # --- updates
    def observe(self, interaction: Interaction, embedding: np.ndarray, domain: str) -> None:
        """Fold one interaction (its question, embedding and lexicon tag) into the profile.

        `domain` is `DomainLexicons.tag(...)`: a profile domain, or "general" (no lexicon word),
        which counts for the style statistics but not for the interests (centroid, histogram)."""
        if domain not in self.domain_counts and domain != GENERAL:
            raise ValueError(
                f"UserProfile.observe: unknown domain '{domain}'; expected '{GENERAL}' or one of {self.domains}"
            )
        vec = np.asarray(embedding, dtype=np.float64).ravel()
        norm = np.linalg.norm(vec)
        if not np.isfinite(norm):
            raise ValueError("UserProfile.observe: embedding has NaN/inf values; check the embedder output")
        vec = vec / norm if norm > 0 else vec
        if self.centroid is not None and self.centroid.shape != vec.shape:
            raise ValueError(
                f"UserProfile.observe: embedding dim {vec.size} differs from the profile's {self.centroid.size}; "
                "use one embedder per device"
            )
        self.n_observed += 1
        if domain != GENERAL:
            # interests: decayed centroid and domain histogram over tagged interactions, with a
            # bias-corrected start (the first items are averaged, not swamped by the zero init)
            self.n_tagged += 1
            rate = max(self.ema, 1.0 / self.n_tagged)
            self.centroid = vec.copy() if self.centroid is None else (1 - rate) * self.centroid + rate * vec
            onehot = np.array([d == domain for d in self.domains], dtype=np.float64)
            self.recent_domains = (1 - rate) * self.recent_domains + rate * onehot
            self.domain_counts[domain] += 1
        words = len(interaction.question.split())
        self.mean_question_words += (words - self.mean_question_words) / self.n_observed
        self.chatter_share += (float(words <= self.chatter_max_words) - self.chatter_share) / self.n_observed

    def record_feedback(self, signal: str) -> None:
        """Count one implicit feedback signal: accept, edit or regenerate."""
        if signal not in self.feedback:
            raise ValueError(f"UserProfile.record_feedback: unknown signal '{signal}'; use one of {FEEDBACK_SIGNALS}")
        self.feedback[signal] += 1

    @property
    def accept_rate(self) -> float:
        """Share of accepted responses among all feedback (0.0 before any feedback)."""
        total = sum(self.feedback.values())
        return self.feedback["accept"] / total if total else 0.0

    # --- interests and drift
    def interest_weights(self) -> dict[str, float]:
        """Normalised recent domain histogram (all zeros before the first observation)."""
        total = self.recent_domains.sum()
        w = self.recent_domains / total if total > 0 else self.recent_domains
        return {d: float(x) for d, x in zip(self.domains, w)}

    def centroid_drift(self) -> float:
        if self.adapted_centroid is None or self.centroid is None:
            return 0.0
        return _cosine_distance(self.centroid, self.adapted_centroid)

    def domain_drift(self) -> float:
        """Total-variation distance between the recent domain histograms now and at adaptation."""
        if self.adapted_domains is None:
            return 0.0
        now = np.array(list(self.interest_weights().values()))
        return float(0.5 * np.abs(now - self.adapted_domains).sum())

    def drift(self) -> float:
        """max(centroid cosine distance, domain-histogram TV distance) since the last adaptation."""
        return max(self.centroid_drift(), self.domain_drift())

    def mark_adapted(self) -> None:
        """Snapshot the profile: drift is measured from here on."""
        self.adapted_centroid = None if self.centroid is None else self.centroid.copy()
        self.adapted_domains = np.array(list(self.interest_weights().values()))
        self.n_adaptations += 1

    def should_adapt(self, new_items: int, min_new_items: int, drift_trigger: float) -> bool:
        """Re-tune when the buffer changed enough (`new_items >= min_new_items`) or the profile
        drifted past `drift_trigger` with at least one new item to learn from."""
        if new_items >= min_new_items:
            return True
        return new_items > 0 and self.drift() >= drift_trigger

    # --- state
    def to_state(self) -> dict[str, Any]:
        """JSON-friendly dict (lists and scalars only)."""

        def arr(x: np.ndarray | None) -> list[float] | None:
            return None if x is None else [float(v) for v in x]

        return {
            "domains": list(self.domains),
            "ema": self.ema,
            "chatter_max_words": self.chatter_max_words,
            "n_observed": self.n_observed,
            "n_tagged": self.n_tagged,
            "centroid": arr(self.centroid),
            "domain_counts": dict(self.domain_counts),
            "recent_domains": arr(self.recent_domains),
            "mean_question_words": self.mean_question_words,
            "chatter_share": self.chatter_share,
            "feedback": dict(self.feedback),
            "adapted_centroid": arr(self.adapted_centroid),
            "adapted_domains": arr(self.adapted_domains),
            "n_adaptations": self.n_adaptations,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "UserProfile":
        def arr(x: list[float] | None) -> np.ndarray | None:
            return None if x is None else np.asarray(x, dtype=np.float64)

        try:
            p = cls(state["domains"], ema=state["ema"], chatter_max_words=state["chatter_max_words"])
            p.n_observed = int(state["n_observed"])
            p.n_tagged = int(state["n_tagged"])
            p.centroid = arr(state["centroid"])
            p.domain_counts = {d: int(state["domain_counts"][d]) for d in p.domains}
            p.recent_domains = arr(state["recent_domains"])
            p.mean_question_words = float(state["mean_question_words"])
            p.chatter_share = float(state["chatter_share"])
            p.feedback = {s: int(state["feedback"][s]) for s in FEEDBACK_SIGNALS}
            p.adapted_centroid = arr(state["adapted_centroid"])
            p.adapted_domains = arr(state["adapted_domains"])
            p.n_adaptations = int(state["n_adaptations"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"corrupt profile state: {err!r} missing or malformed; rebuild the device state") from None
        if p.recent_domains is None or len(p.recent_domains) != len(p.domains):
            raise ValueError("corrupt profile state: 'recent_domains' must have one value per domain")
        return p
