"""The one prompt formatter: chat template when the tokenizer has one, the fixed template otherwise."""

from __future__ import annotations

import copy

import pytest
import torch

from fedasls.pipeline.training import IGNORE_INDEX, TrainingExample, _tensorize
from fedasls.lm.model import generate
from fedasls.lm.prompts import PromptFormat
from fedasls.pipeline.selection import item_text
from fedasls.interaction import Interaction

# A ChatML-like template in plain text that ends each turn with the tokenizer's eos token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
QUESTION, ANSWER = "How do I keep basil fresh?", "Stand it in a glass of water on the counter."


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_lm):
    tok = copy.deepcopy(tiny_lm[1])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_embedded_tokenizer_keeps_the_fixed_template(tiny_lm) -> None:
    tok = tiny_lm[1]
    fmt = PromptFormat(tok)
    assert not fmt.chat and fmt.shape == "plain"
    assert fmt.answer_prompt(f"  {QUESTION} ") == f"Question: {QUESTION}\nAnswer:"
    prompt, answer = fmt.example_ids(QUESTION, ANSWER)
    assert prompt == tok(f"Question: {QUESTION}\nAnswer:")["input_ids"] and prompt[0] == tok.bos_token_id
    assert answer == tok(" " + ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert fmt.stop_ids == [tok.eos_token_id]
    item = Interaction(0, 0, 0.0, QUESTION, "A reply.", ANSWER, "cooking")
    assert fmt.conversation(item.question, item.response) == item_text(item)


def test_tokenizer_with_a_chat_template_gets_templated_prompts(chat_tokenizer) -> None:
    fmt = PromptFormat(chat_tokenizer)
    assert fmt.chat
    prompt = fmt.answer_prompt(QUESTION)
    assert prompt == f"<|user|>\n{QUESTION}</s>\n<|assistant|>\n"
    assert prompt == chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert "Question:" not in prompt
    rewrite = fmt.rewrite_prompt(QUESTION)
    assert rewrite.startswith("<|user|>\n") and QUESTION in rewrite and rewrite.endswith("<|assistant|>\n")
    # Templated text carries its own special tokens: nothing is added when tokenizing it.
    ids = fmt.tokenize([prompt])["input_ids"][0]
    assert ids == chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(chat_tokenizer.bos_token_id) == 0
    assert fmt.conversation(QUESTION, ANSWER) == f"<|user|>\n{QUESTION}</s>\n<|assistant|>\n{ANSWER}</s>"


@pytest.mark.parametrize("chat", [False, True])
def test_loss_masking_covers_only_the_answer_tokens(tiny_lm, chat_tokenizer, chat: bool) -> None:
    tok = chat_tokenizer if chat else tiny_lm[1]
    fmt = PromptFormat(tok)
    short = TrainingExample("Hi?", "Hello there.")
    ids, mask, labels, _ = _tensorize(fmt, [TrainingExample(QUESTION, ANSWER), short], max_length=96).tensors
    for row, ex in enumerate([TrainingExample(QUESTION, ANSWER), short]):
        prompt, answer = fmt.example_ids(ex.question, ex.answer)
        n = len(prompt) + len(answer)
        assert ids[row, :n].tolist() == prompt + answer and mask[row, :n].all() and not mask[row, n:].any()
        assert labels[row, : len(prompt)].eq(IGNORE_INDEX).all() and labels[row, n:].eq(IGNORE_INDEX).all()
        assert labels[row, len(prompt) : n].tolist() == ids[row, len(prompt) : n].tolist()
        # The labelled tokens are exactly the answer and its end token (eos / end of turn).
        labelled = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert labelled[-1] == tok.eos_token_id
        assert tok.decode(labelled[:-1], skip_special_tokens=True).strip() == ex.answer
        if chat:
            assert tok.decode(prompt) == fmt.answer_prompt(ex.question)


def test_generation_goes_through_the_chat_template(tiny_lm, chat_tokenizer) -> None:
    model = tiny_lm[0]
    fmt = PromptFormat(chat_tokenizer)
    answer = generate(model, fmt, [QUESTION], max_new_tokens=6)[0]
    ids = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=fmt.stop_ids,
            pad_token_id=chat_tokenizer.pad_token_id,
        )
    expected = chat_tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
    assert answer == expected


def test_a_tokenizer_passed_instead_of_the_format_is_refused(tiny_lm) -> None:
    with pytest.raises(TypeError, match="PromptFormat"):
        _tensorize(tiny_lm[1], [TrainingExample(QUESTION, ANSWER)], max_length=64)
    with pytest.raises(TypeError, match="PromptFormat"):
        generate(tiny_lm[0], tiny_lm[1], [QUESTION])
