"""Prompt formatting: the one place that turns questions (and answers) into model input.

A `PromptFormat` is built from a tokenizer and has one of two shapes:

- "chat": the tokenizer has a chat template (an instruct model). A question is the user turn of
  `tokenizer.apply_chat_template` with the generation prompt; for training the answer is the
  assistant turn, and its tokens (with the template's end-of-turn token) are the only labelled
  ones. Templated text already holds its special tokens, so it is tokenized without adding more.
- "plain": no chat template (the embedded default model). ``Question: {q}\\nAnswer:`` then, for
  training, a space, the answer and the tokenizer's eos token.

Generation, training, evaluation, feedback answers, synthesis rewrites and LM embeddings all get
their text and token ids from here, so a model always sees the format it was made for.

Prompt-length policy (`fit_question`): a question is its first line (an instruction, a Stack Exchange
title) and, after it, its context (a Dolly `context`, a Stack Exchange question body). When the
formatted prompt does not fit a token budget, the context loses its tail (at a word boundary, marked
with CUT_MARK); only if the first line alone does not fit does it lose its tail too. The template's
turn markers are never cut: the text is cut before it is formatted. Each fit is counted
(`fedasls.lm.cuts`). A prompt that fits is returned unchanged.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, NamedTuple

from transformers import BatchEncoding, PreTrainedTokenizerBase

from fedasls.lm.cuts import note_prompt

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
PLAIN_REWRITE_TEMPLATE = "Rewrite the question in other words.\nQuestion: {question}\nRewrite:"
CHAT_REWRITE_INSTRUCTION = (
    "Paraphrase the following question: ask the same thing in different words. "
    "Reply with the new question only.\n\nQuestion: {question}"
)
_PROBE_ANSWER = "fedasls probe answer"
CUT_MARK = " …"  # ends a context (or question) cut by the prompt-length policy
_WORD_END = re.compile(r"\S+")


class FittedQuestion(NamedTuple):
    """A question fitted to a prompt budget: its text and what was cut."""

    text: str
    context_cut: bool = False  # some of the context (the lines after the first) was dropped
    question_cut: bool = False  # the first line itself lost its tail

Shape = Literal["chat", "plain"]


class PromptFormat:
    """How one tokenizer's model is prompted; holds the tokenizer, so pass this instead of it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before using it")
        self.tokenizer = tokenizer
        self.shape: Shape = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        self._end_of_turn: list[int] = self._probe_end_of_turn() if self.shape == "chat" else []

    @property
    def chat(self) -> bool:
        return self.shape == "chat"

    def __repr__(self) -> str:
        return f"PromptFormat({self.shape}, {type(self.tokenizer).__name__})"

    # ------------------------------------------------------------------ text
    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if not isinstance(text, str):
            raise ValueError(f"the tokenizer's chat template returned {type(text).__name__}, not text")
        return text

    def answer_prompt(self, question: str) -> str:
        """The text a model answers `question` from (generation, evaluation, feedback answers)."""
        question = question.strip()
        if self.chat:
            return self._template([{"role": "user", "content": question}], generation_prompt=True)
        return PLAIN_TEMPLATE.format(question=question)

    def prompt_tokens(self, question: str) -> int:
        """Tokens of `answer_prompt(question)` as the model gets it."""
        return len(self.tokenize([self.answer_prompt(question)])["input_ids"][0])

    def fit_question(self, question: str, budget: int | None) -> FittedQuestion:
        """`question` cut so that its answer prompt takes at most `budget` tokens (the module's policy).

        None or a prompt that fits: the question unchanged. Else the context (the lines after the
        first) is cut from its tail at a word boundary, then, if the first line alone does not fit,
        the first line's tail. A ValueError when not even the template fits the budget.
        """
        if budget is None or self.prompt_tokens(question) <= budget:
            return FittedQuestion(question)
        head, _, context = question.strip().partition("\n")
        fits = lambda text: self.prompt_tokens(text) <= budget  # noqa: E731
        if context.strip() and fits(head):
            kept = _longest_prefix(context, lambda prefix: f"{head}\n{prefix}{CUT_MARK}", fits)
            return FittedQuestion(f"{head}\n{kept}{CUT_MARK}" if kept else head, context_cut=True)
        kept = _longest_prefix(head, lambda prefix: f"{prefix}{CUT_MARK}", fits)
        if not kept and not fits(CUT_MARK):
            raise ValueError(
                f"the prompt template alone takes {self.prompt_tokens('')} tokens, more than the budget of {budget} "
                "(the model's window minus evaluation.max_new_tokens, or adaptation.max_length minus the answer's "
                "share); lower evaluation.max_new_tokens or raise adaptation.max_length"
            )
        return FittedQuestion(f"{kept}{CUT_MARK}", context_cut=bool(context.strip()), question_cut=True)

    def fitted_prompt(self, question: str, budget: int | None) -> str:
        """The answer prompt of `question` fitted to `budget` tokens (`fit_question`), counted in fedasls.lm.cuts."""
        fitted = self.fit_question(question, budget)
        note_prompt(fitted.context_cut, fitted.question_cut)
        return self.answer_prompt(fitted.text)

    def rewrite_prompt(self, question: str) -> str:
        """The text a model paraphrases `question` from (synthesis)."""
        question = question.strip()
        if self.chat:
            content = CHAT_REWRITE_INSTRUCTION.format(question=question)
            return self._template([{"role": "user", "content": content}], generation_prompt=True)
        return PLAIN_REWRITE_TEMPLATE.format(question=question)

    def conversation(self, question: str, answer: str) -> str:
        """One finished exchange as the model sees it (LM embeddings of an interaction)."""
        if self.chat:
            prompt, answer_turn = self._answer_turn(question, answer)
            return prompt + answer_turn
        return f"{question}\n{answer}"

    def _answer_turn(self, question: str, answer: str) -> tuple[str, str]:
        """(prompt text, answer text up to and including the end-of-turn marker) of a chat exchange."""
        prompt = self.answer_prompt(question)
        full = self._template(
            [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}],
            generation_prompt=False,
        )
        if not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat template does not extend the generation prompt with the assistant turn "
                "(the templated conversation does not start with the templated prompt), so the answer tokens "
                "cannot be told apart; use a model whose template does, or remove its chat_template"
            )
        return prompt, full[len(prompt) :].rstrip()

    # ------------------------------------------------------------------ tokens
    @property
    def add_special_tokens(self) -> bool:
        """Whether tokenizing a formatted text adds the tokenizer's special tokens (plain only)."""
        return not self.chat

    def tokenize(self, texts: list[str], **kwargs: Any) -> BatchEncoding:
        """Tokenize formatted texts (prompts or conversations) the way this format needs."""
        return self.tokenizer(texts, add_special_tokens=self.add_special_tokens, **kwargs)

    def example_ids(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of a training pair: (prompt, answer). Only the answer part carries loss.

        Plain: the answer is " answer" + eos. Chat: the assistant turn up to and including the
        template's end-of-turn token (eos appended if the template ends turns without one).
        """
        tok = self.tokenizer
        if not self.chat:
            prompt = tok(self.answer_prompt(question), add_special_tokens=True)["input_ids"]
            return prompt, tok(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt_text, answer_text = self._answer_turn(question, answer)
        prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = tok(answer_text, add_special_tokens=False)["input_ids"]
        if not answer_ids or answer_ids[-1] not in self.stop_ids:
            answer_ids.append(tok.eos_token_id)
        return prompt, answer_ids

    def _probe_end_of_turn(self) -> list[int]:
        """The token(s) the chat template closes an assistant turn with (from a probe exchange)."""
        _, answer_text = self._answer_turn("fedasls probe question", _PROBE_ANSWER)
        at = answer_text.find(_PROBE_ANSWER)
        tail = answer_text[at + len(_PROBE_ANSWER) :] if at >= 0 else ""
        return self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: eos, plus the chat template's end-of-turn token."""
        ids = [self.tokenizer.eos_token_id]
        if len(self._end_of_turn) == 1 and self._end_of_turn[0] not in ids:
            ids.append(self._end_of_turn[0])
        return ids

    def clean_answer(self, text: str) -> str:
        """A decoded answer, stripped; the plain format also stops where a new question starts."""
        if not self.chat:
            for stop in ("\nQuestion:", "Question:"):
                text = text.split(stop, 1)[0]
        return text.strip()


def _longest_prefix(text: str, compose: Callable[[str], str], fits: Callable[[str], bool]) -> str:
    """The longest word-boundary prefix of `text` whose `compose(prefix)` fits ("" when none does).
    Binary search: a prompt grows with its prefix."""
    ends = [m.end() for m in _WORD_END.finditer(text)]
    low, high = 0, len(ends)  # words kept: low fits (0 = nothing), high + 1 does not
    while low < high:
        mid = (low + high + 1) // 2
        if fits(compose(text[: ends[mid - 1]])):
            low = mid
        else:
            high = mid - 1
    return text[: ends[low - 1]] if low else ""


def check_prompt_format(prompts: object) -> PromptFormat:
    """`prompts` itself if it is a PromptFormat, else a TypeError saying what to pass."""
    if not isinstance(prompts, PromptFormat):
        raise TypeError(
            f"expected a fedasls.lm.prompts.PromptFormat, got {type(prompts).__name__}: pass "
            "PromptFormat(tokenizer) (DeviceRuntime.prompts) instead of the tokenizer"
        )
    return prompts
