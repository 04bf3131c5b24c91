"""The long-answer policy: training windows cover a long answer (each token labelled once), the cap
drops and counts the tail, DP keeps one row per answer; reference-length evaluation; feedback on long
preferences compares like with like."""

from __future__ import annotations

import pytest

from fedasls.config import FeedbackSettings
from fedasls.interaction import Interaction
from fedasls.lm import cuts
from fedasls.lm.prompts import PromptFormat
from fedasls.pipeline.evaluation import REFERENCE_SLACK, answer_tokens
from fedasls.pipeline.feedback import SimulatedUser
from fedasls.pipeline.training import IGNORE_INDEX, TrainingExample, _tensorize

QUESTION = "How should I prune tomato plants?"
LONG_ANSWER = " ".join(f"Step {i}: pinch the side shoot above leaf {i} and water the roots well." for i in range(30))
UNRELATED = " ".join("My bicycle chain needs oil before a long ride along sandy coasts." for _ in range(30))


@pytest.fixture(scope="module")
def fmt(tiny_lm) -> PromptFormat:
    return PromptFormat(tiny_lm[1])


def _labelled(labels) -> list[int]:
    return [t for t in labels.tolist() if t != IGNORE_INDEX]


def test_a_long_answer_becomes_windows_that_label_every_answer_token_once(fmt) -> None:
    prompt, answer = fmt.example_ids(QUESTION, LONG_ANSWER)
    max_length = 64
    assert len(prompt) + len(answer) > 2 * max_length  # several windows needed
    with cuts.record() as counted:
        ids, mask, labels, weights = _tensorize(fmt, [TrainingExample(QUESTION, LONG_ANSWER, 0.5)], max_length,
                                                chunks=None, count=True).tensors
    assert len(ids) >= 3 and weights.tolist() == [0.5] * len(ids)
    covered = []
    for row in range(len(ids)):
        n = int(mask[row].sum())
        assert n <= max_length and ids[row, : len(prompt)].tolist() == prompt  # every window has the whole prompt
        if row:  # later windows re-read the answer before their labelled part, unlabelled
            assert labels[row, len(prompt)].item() == IGNORE_INDEX
        covered += _labelled(labels[row])
    assert covered == answer  # the whole answer, each token once, in order
    assert (counted.answers, counted.answers_cut, counted.answer_tokens_cut) == (1, 0, 0)
    assert counted.answer_tokens == len(answer)


def test_later_window_stops_off_leaves_only_a_later_windows_end_of_turn_unlabelled(fmt) -> None:
    _, answer = fmt.example_ids(QUESTION, LONG_ANSWER)
    assert answer[-1] in fmt.stop_ids
    long, short = TrainingExample(QUESTION, LONG_ANSWER), TrainingExample(QUESTION, "Pinch the side shoots.")
    on = _tensorize(fmt, [long, short], 64).tensors[2]
    off = _tensorize(fmt, [long, short], 64, later_window_stops=False).tensors[2]
    windows = len(on) - 1
    assert windows >= 3
    assert sum(map(_labelled, on[:windows]), []) == answer  # default: the last window teaches the stop
    assert sum(map(_labelled, off[:windows]), []) == answer[:-1]  # off: every token but that stop, once
    _, short_answer = fmt.example_ids(QUESTION, "Pinch the side shoots.")
    assert _labelled(off[windows]) == _labelled(on[windows]) == short_answer  # a first window keeps its stop
    stop_alone = 0  # answers whose last window labels the stop alone: off makes no empty row of it
    for words in range(40, 120):
        text = " ".join(LONG_ANSWER.split()[:words])
        _, ids = fmt.example_ids(QUESTION, text)
        on_rows = [_labelled(r) for r in _tensorize(fmt, [TrainingExample(QUESTION, text)], 64).tensors[2]]
        off_rows = [_labelled(r) for r in _tensorize(fmt, [TrainingExample(QUESTION, text)], 64,
                                                     later_window_stops=False).tensors[2]]
        stop_alone += on_rows[-1] == ids[-1:] and len(on_rows) > 1
        assert all(off_rows) and sum(off_rows, []) == (ids[:-1] if len(on_rows) > 1 else ids)
    assert stop_alone > 0


def test_the_window_cap_drops_the_tail_and_counts_it_and_dp_keeps_one_row(fmt) -> None:
    _, answer = fmt.example_ids(QUESTION, LONG_ANSWER)
    example = [TrainingExample(QUESTION, LONG_ANSWER)]
    with cuts.record() as counted:
        two = _tensorize(fmt, example, 64, chunks=2, count=True).tensors
    assert len(two[0]) == 2
    kept = sum(len(_labelled(row)) for row in two[2])
    assert kept < len(answer)
    assert (counted.answers_cut, counted.answer_tokens_cut) == (1, len(answer) - kept)
    one = _tensorize(fmt, example, 64, chunks=1).tensors  # adaptation.dp: one row per interaction
    assert len(one[0]) == 1 and _labelled(one[2][0]) == answer[: len(_labelled(one[2][0]))]


def test_a_long_prompt_gives_way_to_the_answer_by_cutting_its_context(fmt) -> None:
    question = QUESTION + "\n" + " ".join(f"My garden bed {i} gets sun until noon." for i in range(30))
    prompt, answer = fmt.example_ids(question, "Pinch the side shoots weekly.")
    max_length = 48
    assert len(prompt) > max_length
    with cuts.record() as counted:
        ids, mask, labels, _ = _tensorize(fmt, [TrainingExample(question, "Pinch the side shoots weekly.")],
                                          max_length, count=True).tensors
    assert len(ids) == 1 and int(mask[0].sum()) <= max_length
    assert _labelled(labels[0]) == answer  # the short answer whole
    text = fmt.tokenizer.decode(ids[0, : int(mask[0].sum())].tolist())
    assert QUESTION in text and "\nAnswer:" in text  # the question and the template survive
    assert (counted.prompts_cut, counted.questions_cut) == (1, 0)


def test_short_examples_are_one_row_as_before(fmt) -> None:
    prompt, answer = fmt.example_ids(QUESTION, "Pinch the side shoots.")
    ids, mask, labels, _ = _tensorize(fmt, [TrainingExample(QUESTION, "Pinch the side shoots.")], 96).tensors
    assert len(ids) == 1 and ids[0, : int(mask[0].sum())].tolist() == prompt + answer


def test_reference_length_answers_grow_with_the_reference_up_to_the_cap(fmt) -> None:
    longest = len(fmt.tokenizer(LONG_ANSWER, add_special_tokens=False)["input_ids"])
    assert answer_tokens(fmt, [LONG_ANSWER, "short"], least=72, cap=None) == 72  # new_tokens = "fixed"
    assert answer_tokens(fmt, ["short"], least=72, cap=1000) == 72
    assert answer_tokens(fmt, [LONG_ANSWER, "short"], least=72, cap=10_000) == round(longest * REFERENCE_SLACK + 0.4999)
    assert answer_tokens(fmt, [LONG_ANSWER], least=72, cap=100) == 100


def _item(preferred: str) -> Interaction:
    return Interaction(0, 1, 0.0, QUESTION, "generic", preferred, "garden")


def test_feedback_on_long_answers_compares_like_with_like() -> None:
    user = SimulatedUser(FeedbackSettings())
    capped_own = " ".join(LONG_ANSWER.split()[:50])  # what a capped answer in the user's own words says
    capped_unrelated = " ".join(UNRELATED.split()[:50])
    assert len(LONG_ANSWER.split()) > 300
    assert user.react(_item(LONG_ANSWER), capped_own).signal == "accept"
    assert user.react(_item(LONG_ANSWER), LONG_ANSWER).signal == "accept"
    assert user.react(_item(LONG_ANSWER), capped_unrelated).signal == "regenerate"
    assert user.react(_item(LONG_ANSWER), UNRELATED).signal == "regenerate"
    # A few opening words are still compared with half of long_answer_words: not an accept.
    assert user.react(_item(LONG_ANSWER), "Step 0: pinch").signal != "accept"
    # Without the length normalisation the capped own answer could not be accepted (the boundary under test).
    whole = SimulatedUser(FeedbackSettings(long_answer_words=None))
    assert whole.react(_item(LONG_ANSWER), capped_own).signal != "accept"
    # Preferences up to long_answer_words words are compared whole, as before.
    short = " ".join(LONG_ANSWER.split()[:80])
    assert user.reference(short, "anything") == short
