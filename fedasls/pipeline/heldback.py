"""The held-back split of a device's annotated items, with near-duplicates grouped.

The adaptation gate (fedasls/device/device.py) compares a newly trained adapter with the kept one on
items that no adapter was ever trained on. So the split is *stable*: once an item is held back it
stays held back for as long as it is buffered, and an item that is a near-duplicate of a held-back
item (or of a training item) joins that item's side. New groups go to the held-back side at
random (seeded per group) with probability `fraction`, and more are moved there until at least
`minimum` groups are held back (never more than half of the groups). The gate scores one item per
held-back group (`one_per_group`): four rewordings of one question are one piece of evidence.

Near-duplicates: two items whose questions have ROUGE-1 F >= `question_similarity`, or whose
answers have ROUGE-1 F >= `answer_similarity` (the same answer to a reworded question), joined
transitively (union-find).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

from rouge_score.tokenizers import DefaultTokenizer

QUESTION_SIMILARITY = 0.8  # measured: 88% of the stream's near-duplicate pairs, 2.5% of distinct pairs
ANSWER_SIMILARITY = 0.9  # distinct answers of one user stay below 0.86 (99th percentile)


def _rouge1(a: Counter, b: Counter) -> float:
    """ROUGE-1 F-measure of two token multisets (what rouge-score computes from its tokens)."""
    overlap = sum((a & b).values())
    return 2 * overlap / (sum(a.values()) + sum(b.values())) if overlap else 0.0


def near_duplicate_groups(
    pairs: Sequence[tuple[str, str]],
    question_similarity: float = QUESTION_SIMILARITY,
    answer_similarity: float = ANSWER_SIMILARITY,
) -> list[int]:
    """A group label per (question, answer) pair: the index of the group's first member."""
    tokenizer = DefaultTokenizer(use_stemmer=False)  # rouge-score's own ROUGE-1 tokenization
    questions = [Counter(tokenizer.tokenize(q)) for q, _ in pairs]
    answers = [Counter(tokenizer.tokenize(a)) for _, a in pairs]
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            if find(i) == find(j):
                continue
            if pairs[i][0].strip().lower() == pairs[j][0].strip().lower() \
                    or _rouge1(questions[i], questions[j]) >= question_similarity \
                    or _rouge1(answers[i], answers[j]) >= answer_similarity:
                parent[max(find(i), find(j))] = min(find(i), find(j))
    return [find(i) for i in range(len(pairs))]


def assign_heldback(
    keys: Sequence[int],
    pairs: Sequence[tuple[str, str]],
    heldback: set[int],
    trained: set[int],
    *,
    eligible: set[int] | None = None,
    fraction: float,
    minimum: int,
    seed: int,
) -> set[int]:
    """The keys (e.g. interaction indices) to hold back, given the sides already decided.

    `keys[i]` names `pairs[i]`; `heldback` / `trained` are keys already on each side. A group with
    a held-back member is held back whole (held-back wins over trained: an item is never trained
    on while a near-duplicate of it is held back); a group with a trained member stays on the
    training side; new groups with an `eligible` key (default: all; e.g. only items whose answer
    is the user's own) are drawn as described in the module docstring.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"assign_heldback: fraction must be in [0, 1], got {fraction}")
    labels = near_duplicate_groups(pairs)
    members: dict[int, list[int]] = {}
    for key, label in zip(keys, labels):
        members.setdefault(label, []).append(key)
    out: set[int] = set()
    new_groups: list[list[int]] = []
    for group in members.values():
        if any(k in heldback for k in group):
            out.update(group)
        elif not any(k in trained for k in group) and (eligible is None or any(k in eligible for k in group)):
            new_groups.append(group)
    drawn: list[list[int]] = []
    for group in new_groups:
        u = np.random.default_rng([seed, zlib.crc32(str(min(group)).encode())]).random()
        (drawn if u < fraction else []).append(group)
    for group in drawn:
        out.update(group)
    rest = [g for g in new_groups if g not in drawn]
    max_heldback_groups = len(members) // 2
    held_groups = sum(1 for g in members.values() if set(g) & out)
    for group in sorted(rest, key=min):
        if held_groups >= minimum or held_groups >= max_heldback_groups:
            break
        out.update(group)
        held_groups += 1
    return out


def one_per_group(pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Indices of the first pair of each near-duplicate group, in order."""
    labels = near_duplicate_groups(pairs)
    return [i for i, label in enumerate(labels) if label == i]
