"""How much text was cut to fit the model's window: prompts (context, then question) and answers.

The prompt-length policy (`fedasls.lm.prompts.PromptFormat.fit_question`) and the training-example
builder (`fedasls.pipeline.training`) note every prompt and answer they fit; a caller counts them
with `record()`, as the stage timer does (`fedasls.device.timing`):

    with record() as cuts:
        run_device_round(...)
    cuts.metrics()  # {"prompts_cut_share": ..., "answer_tokens_cut_share": ..., ...}

Counting costs nothing when no one records. A `record()` inside another adds its counts to the outer
one when it ends. Counts are per use: a held-back prompt the gate scores five times counts five times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from fedasls.recording import Recording


@dataclass
class CutCounts:
    """Prompts and answers fitted to a window, and how many of them were cut."""

    prompts: int = 0  # prompts formatted for generation or training
    prompts_cut: int = 0  # ... of which the context (or more) was cut
    questions_cut: int = 0  # ... of which the question itself (the first line) lost its tail
    answers: int = 0  # answers turned into training / scoring examples
    answers_cut: int = 0  # ... of which tokens were dropped (beyond adaptation.answer_chunks windows)
    answer_tokens: int = 0  # their tokens
    answer_tokens_cut: int = 0  # ... dropped

    def add(self, other: "CutCounts") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def metrics(self) -> dict[str, float | int]:
        """Counts plus three shares for a device's reply (NaN where nothing was counted)."""
        def share(part: int, whole: int) -> float:
            return part / whole if whole else math.nan

        out: dict[str, float | int] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["prompts_cut_share"] = share(self.prompts_cut, self.prompts)
        out["answers_cut_share"] = share(self.answers_cut, self.answers)
        out["answer_tokens_cut_share"] = share(self.answer_tokens_cut, self.answer_tokens)
        return out


_CUTS: Recording[CutCounts] = Recording("fedasls_cut_counts", CutCounts, CutCounts.add)
record = _CUTS.record  # count the cuts made inside the block into new counts (added to an enclosing recording)


def note_prompt(context_cut: bool, question_cut: bool) -> None:
    """One prompt fitted: was its context (or more) cut, did its question lose its tail."""
    counts = _CUTS.current()
    if counts is not None:
        counts.prompts += 1
        counts.prompts_cut += int(context_cut or question_cut)
        counts.questions_cut += int(question_cut)


def note_answer(tokens: int, dropped: int) -> None:
    """One answer made into examples: its token count and how many of them no example holds."""
    counts = _CUTS.current()
    if counts is not None:
        counts.answers += 1
        counts.answers_cut += int(dropped > 0)
        counts.answer_tokens += tokens
        counts.answer_tokens_cut += dropped
