"""The prompt-length policy (PromptFormat.fit_question): a prompt that does not fit loses its context's
tail first, its question's tail last, never the template's turn markers; every fit is counted."""

from __future__ import annotations

import copy

import pytest

from fedasls.lm import cuts
from fedasls.lm.model import generate
from fedasls.lm.prompts import CUT_MARK, PromptFormat

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
QUESTION = "How long should I rest bread dough before baking it?"
CONTEXT = " ".join(f"The recipe step {i} says to fold the dough gently and wait a little." for i in range(40))


@pytest.fixture(scope="module", params=["plain", "chat"])
def fmt(request, tiny_lm) -> PromptFormat:
    tok = tiny_lm[1]
    if request.param == "chat":
        tok = copy.deepcopy(tok)
        tok.chat_template = CHAT_TEMPLATE
    return PromptFormat(tok)


def _markers(fmt: PromptFormat) -> tuple[str, str]:
    """How the template opens and closes a prompt (from an empty question)."""
    empty = fmt.answer_prompt("")
    return (empty.split("\n", 1)[0], "<|assistant|>\n") if fmt.chat else ("Question:", "\nAnswer:")


def test_a_prompt_that_fits_is_unchanged_and_counted_uncut(fmt) -> None:
    question = f"{QUESTION}\nA short context."
    with cuts.record() as counted:
        text = fmt.fitted_prompt(question, budget=10_000)
        fmt.fitted_prompt(question, budget=None)
    assert text == fmt.answer_prompt(question)
    assert (counted.prompts, counted.prompts_cut, counted.questions_cut) == (2, 0, 0)


def test_the_context_is_cut_and_the_question_and_turn_markers_survive(fmt) -> None:
    question = f"{QUESTION}\n{CONTEXT}"
    full = fmt.prompt_tokens(question)
    budget = fmt.prompt_tokens(QUESTION) + 40
    assert full > budget  # the case under test: it does not fit
    fitted = fmt.fit_question(question, budget)
    assert fitted.context_cut and not fitted.question_cut
    assert fitted.text.startswith(f"{QUESTION}\n") and fitted.text.endswith(CUT_MARK)
    kept = fitted.text[len(QUESTION) + 1 : -len(CUT_MARK)]
    assert kept and CONTEXT.startswith(kept)  # a head of the context, cut at a word boundary
    assert CONTEXT[len(kept)] == " "
    prompt = fmt.answer_prompt(fitted.text)
    assert fmt.prompt_tokens(fitted.text) <= budget
    opening, closing = _markers(fmt)
    assert prompt.startswith(opening) and prompt.endswith(closing) and QUESTION in prompt
    # The longest such head: one more word would not fit.
    more = CONTEXT[: CONTEXT.index(" ", len(kept) + 1)]
    assert fmt.prompt_tokens(f"{QUESTION}\n{more}{CUT_MARK}") > budget


def test_a_question_alone_too_long_loses_its_tail_last_and_is_counted(fmt) -> None:
    long_question = " ".join(["why does my sourdough starter smell of acetone"] * 12)
    question = f"{long_question}\n{CONTEXT}"
    budget = fmt.prompt_tokens("") + 12
    with cuts.record() as counted:
        prompt = fmt.fitted_prompt(question, budget)
    fitted = fmt.fit_question(question, budget)
    assert fitted.question_cut and fitted.context_cut
    assert long_question.startswith(fitted.text[: -len(CUT_MARK)]) and len(fitted.text) > len(CUT_MARK) + 5
    assert fmt.prompt_tokens(fitted.text) <= budget
    opening, closing = _markers(fmt)
    assert prompt.startswith(opening) and prompt.endswith(closing)
    assert (counted.prompts, counted.prompts_cut, counted.questions_cut) == (1, 1, 1)


def test_a_budget_below_the_template_is_a_clear_error(fmt) -> None:
    with pytest.raises(ValueError, match="template alone takes"):
        fmt.fit_question(f"{QUESTION}\n{CONTEXT}", budget=1)


def test_generation_fits_long_prompts_to_the_window_by_the_policy(tiny_lm) -> None:
    model, tok = tiny_lm
    fmt = PromptFormat(tok)
    window = model.config.max_position_embeddings
    question = f"{QUESTION}\n{CONTEXT}"
    assert fmt.prompt_tokens(question) > window  # the old right-hand truncation would cut "\nAnswer:" away
    with cuts.record() as counted:
        answers = generate(model, fmt, [question, QUESTION], max_new_tokens=8)
    assert len(answers) == 2
    assert (counted.prompts, counted.prompts_cut, counted.questions_cut) == (2, 1, 0)
    assert counted.metrics()["prompts_cut_share"] == 0.5
