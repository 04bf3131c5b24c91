"""Speed-ups of the device round keep its results: same losses, embeddings, answers and metrics.

Each speed-up is a setting (adaptation.answer_only_head, fast_lora_backward, fused_adamw;
evaluation.merge_adapter; selection.embed_without_head): on takes the fast path, off the plain one,
and both give the same results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedasls.pipeline.evaluation import evaluate
from fedasls.pipeline.training import IGNORE_INDEX, TrainingExample, _per_example_loss, _tensorize, train_adapter
from fedasls.interaction import Interaction
from fedasls.lm.embedding import LMEmbedder
from fedasls.lm.lora import adapter_state, attach_lora, load_adapter_state
from fedasls.config import AdaptationSettings, Settings, load_settings
from fedasls.device.worker import resource_key
from fedasls.device.round import load_device, run_device_round
from fedasls.lm.fast_lora import fast_lora_training
from fedasls.sim.heterogeneity import HeterogeneityModel
from fedasls.lm.merged_adapter import merged_adapter
from fedasls.lm.model import embed_last_token, generate, generation_batch_size, load_model
from fedasls.lm.prompts import PromptFormat
from fedasls.device.worker import DeviceRuntime
from fedasls.device.store import DeviceStore

PAIRS = [
    ("what do i cook on sundays?", "you cook pasta with basil and a lot of garlic on sundays"),
    ("where do i run?", "in the park by the river"),
    ("which book am i reading at the moment, and why do i like it?", "dune, for the second time"),
]


def _nonzero_lora(model, dropout: float = 0.0):
    """`model` (a private copy: LoRA wraps it in place) with a rank-4 adapter whose B is not zero, so the LoRA path matters."""
    peft = attach_lora(model, 4, 8, dropout, "p")
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return peft


@pytest.fixture()
def peft_lm(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    return _nonzero_lora(model), PromptFormat(tokenizer)


def test_answer_only_head_gives_the_full_logits_loss_and_gradients(peft_lm):
    model, prompts = peft_lm
    ids, mask, labels, _ = _tensorize(prompts, [TrainingExample(q, a) for q, a in PAIRS], 96).tensors
    model.train()
    lean = _per_example_loss(model, ids, mask, labels)
    lean.sum().backward()
    lean_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # the reference: Hugging Face's logits
    target = labels[:, 1:]
    token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="none").view(target.shape)
    full = token.sum(1) / (target != IGNORE_INDEX).sum(1)
    full.sum().backward()
    torch.testing.assert_close(lean, full, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(lean_grads[name], param.grad, rtol=1e-5, atol=1e-7)


def _loss_and_grads(model, batch, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # the same dropout masks on both paths
    model.zero_grad()
    loss = _per_example_loss(model, *batch)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fast_lora_backward_gives_peft_losses_and_gradients(tiny_model_dir, dropout):
    model, tokenizer = load_model(tiny_model_dir)
    peft = _nonzero_lora(model, dropout)
    ids, mask, labels, _ = _tensorize(PromptFormat(tokenizer), [TrainingExample(q, a) for q, a in PAIRS], 96).tensors
    peft.train()
    expected_loss, expected = _loss_and_grads(peft, (ids, mask, labels), seed=3)
    wrapped = sum(1 for n, _ in peft.named_modules() if n.endswith(".lora_A"))
    with fast_lora_training(peft) as fast:
        assert fast == wrapped > 0
        loss, grads = _loss_and_grads(peft, (ids, mask, labels), seed=3)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7)
    assert all(not m.lora_variant for m in peft.modules() if hasattr(m, "lora_variant"))


def test_fast_lora_backward_on_bfloat16_base_weights_gives_peft_losses_and_gradients(tiny_model_dir):
    """model.dtype = bfloat16: the base layers compute in bfloat16, peft keeps the adapter in float32."""
    model, tokenizer = load_model(tiny_model_dir, dtype="bfloat16")
    peft = _nonzero_lora(model)
    lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    ids, mask, labels, _ = _tensorize(PromptFormat(tokenizer), [TrainingExample(q, a) for q, a in PAIRS], 96).tensors
    peft.train()
    expected_loss, expected = _loss_and_grads(peft, (ids, mask, labels), seed=3)
    with fast_lora_training(peft):
        loss, grads = _loss_and_grads(peft, (ids, mask, labels), seed=3)
    assert grads.keys() == expected.keys() and {g.dtype for g in grads.values()} == {torch.float32}
    torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=2e-2)  # bfloat16: ~3 significant digits
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=5e-2, atol=5e-3)


def test_fast_lora_training_gives_peft_its_own_path_back_after_an_error(peft_lm):
    model, _ = peft_lm
    with pytest.raises(RuntimeError, match="inside"), fast_lora_training(model):
        assert any(m.lora_variant for m in model.modules() if hasattr(m, "lora_variant"))
        raise RuntimeError("inside")
    assert all(not m.lora_variant for m in model.modules() if hasattr(m, "lora_variant"))


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_a_merged_adapter_gives_the_unmerged_logits_and_leaves_the_base_weights_bit_for_bit(peft_lm):
    model, prompts = peft_lm
    ids, mask, _, _ = _tensorize(prompts, [TrainingExample(q, a) for q, a in PAIRS], 96).tensors
    model.eval()
    before = _base_weights(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    with merged_adapter(model) as merged:
        assert merged
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    with pytest.raises(RuntimeError, match="inside"), merged_adapter(model):
        raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_nothing_is_merged_for_a_disabled_adapter_or_a_training_model(peft_lm):
    model, _ = peft_lm
    before = _base_weights(model)
    model.eval()
    with model.disable_adapter(), merged_adapter(model) as merged:
        assert not merged
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.train()
    with merged_adapter(model) as merged:
        assert not merged


def test_embeddings_skip_the_head_and_match_the_full_models_last_hidden_state(peft_lm):
    model, prompts = peft_lm
    texts = [q for q, _ in PAIRS]
    with model.disable_adapter(), torch.no_grad():
        fast = embed_last_token(model, prompts, texts)
        enc = prompts.tokenize(texts, return_tensors="pt", padding=True, padding_side="right")
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
        ref = hidden[torch.arange(len(texts)), enc["attention_mask"].sum(1) - 1].numpy()
    np.testing.assert_array_equal(fast, ref)


def test_generation_batches_are_sized_for_the_model_and_give_the_same_answers(peft_lm):
    model, prompts = peft_lm
    size = generation_batch_size(model, 100)
    assert 16 < size <= 64  # the tiny model: full batches
    huge = type("Config", (), {"num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
                               "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128_000})()
    assert generation_batch_size(type("Model", (), {"config": huge})(), 4096) == 1  # a 70B-class model: one row
    smol = type("Config", (), {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                               "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49_152})()
    def weights_in(dtype):
        return type("Model", (), {"config": smol, "parameters": lambda self: iter([torch.zeros(1, dtype=dtype)])})()
    rows32, rows16 = (generation_batch_size(weights_in(d), 1024) for d in (torch.float32, torch.bfloat16))
    assert rows32 < 40 and 1.9 * rows32 <= rows16  # a bfloat16 KV cache holds twice the rows
    questions = [f"{q} ({i})" for i in range(6) for q, _ in PAIRS]
    assert generate(model, prompts, questions, 10) == generate(model, prompts, questions, 10, batch_size=4)


def test_a_round_without_adaptation_reports_the_saved_evaluation_unchanged(tiny_model_dir, tmp_path):
    settings = Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": 3, "stream_length": 30, "heldout": 2},
        "synthesis": {"method": "fallback", "rewrites": 1},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2},
        "evaluation": {"max_new_tokens": 6},
        "heterogeneity": {"availability": "always"},
    })
    runtime, store = DeviceRuntime(settings), DeviceStore(tmp_path)
    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
    first = run_device_round(1, 40 * 86400.0, runtime, settings, store, hetero)
    again = run_device_round(1, 40 * 86400.0, runtime, settings, store, hetero)
    assert first.adapted == 1 and again.adapted == 0 and again.new_interactions == 0
    assert again.stage_seconds["stage_evaluate_s"] == 0.0  # not recomputed ...
    personal, base = load_device(1, runtime, settings, store, hetero).evaluate()  # ... and what a fresh evaluation gives
    assert (again.rouge1, again.perplexity, again.base_rouge1) == (personal.rouge1, personal.perplexity, base.rouge1)
    assert (again.rouge1, again.base_rouge1) == (first.rouge1, first.base_rouge1)


def test_a_round_whose_gate_keeps_the_old_adapter_reuses_the_saved_evaluation(tiny_model_dir, tmp_path):
    settings = Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": 3, "stream_length": 40, "heldout": 2},
        "synthesis": {"method": "fallback", "rewrites": 1},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2, "gate": "off"},  # round 1 keeps its adapter
        "evaluation": {"max_new_tokens": 6},
        "heterogeneity": {"availability": "always"},
    })
    strict = settings.model_copy(update={"adaptation": settings.adaptation.model_copy(
        update={"gate": "rouge1", "gate_margin": 1.0})})  # round 2: no candidate wins by a whole ROUGE-1 point
    runtime, store = DeviceRuntime(settings), DeviceStore(tmp_path)
    hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
    first = run_device_round(1, 6.6 * 86400.0, runtime, settings, store, hetero)  # the stream runs from day 5.9 to 7.4
    again = run_device_round(1, 40 * 86400.0, runtime, strict, store, hetero)
    state = load_device(1, runtime, strict, store, hetero)
    assert first.adapted == 1 and again.adapted == 1 and again.new_interactions > 0  # two adaptations ...
    assert state.counters.gate_accepted == 1 and state.counters.gate_rejected == 1  # ... the second one rejected
    assert first.stage_seconds["stage_evaluate_s"] > 0 and again.stage_seconds["stage_evaluate_s"] == 0.0
    personal, base = state.evaluate()  # a fresh evaluation of the kept adapter gives the reused figures
    assert (again.rouge1, again.perplexity, again.accept_rate) == (personal.rouge1, personal.perplexity, personal.accept_rate)
    assert (again.rouge1, again.perplexity, again.base_rouge1) == (first.rouge1, first.perplexity, base.rouge1)


def test_batch_base_scores_base_and_adapter_in_one_batch_with_the_separate_calls_figures(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    import fedasls.pipeline.evaluation as evaluation

    calls: list[list[tuple[str, str]]] = []
    real = evaluation.generate_mixed
    # a spy, not a mock: it records which rows share one call, then runs the real generation (one batch against
    # two calls is what batch_base changes; the figures, asserted equal below, cannot show it)
    monkeypatch.setattr(evaluation, "generate_mixed", lambda model, prompts, rows, *a: calls.append(rows) or
                        real(model, prompts, rows, *a))
    results = {}
    for batch_base in (False, True):
        settings = Settings.model_validate({
            "model": {"path": str(tiny_model_dir)},
            "population": {"num_devices": 3, "stream_length": 30, "heldout": 3},
            "synthesis": {"method": "fallback", "rewrites": 1},
            "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2, "gate": "off", "batch_gate": False},
            "evaluation": {"max_new_tokens": 6, "batch_base": batch_base},
            "heterogeneity": {"availability": "always"},
        })
        runtime, store = DeviceRuntime(settings), DeviceStore(tmp_path / str(batch_base))
        hetero = HeterogeneityModel.from_settings(settings.heterogeneity)
        results[batch_base] = run_device_round(1, 40 * 86400.0, runtime, settings, store, hetero)
        assert results[batch_base].adapted == 1
        assert len(calls) == int(batch_base)  # with batch_base: one mixed batch, base rows beside the adapter's
    assert sorted({name for _, name in calls[0]})[0] == "__base__" and len({name for _, name in calls[0]}) == 2
    separate, batched = results[False], results[True]
    assert (batched.rouge1, batched.base_rouge1, batched.accept_rate) == \
        (separate.rouge1, separate.base_rouge1, separate.accept_rate)
    assert batched.perplexity == pytest.approx(separate.perplexity, rel=1e-4)


def _head_inputs(model) -> tuple[list[int], object]:
    """The rank of every input the model's vocabulary head gets (2: answer rows only; 3: every position)."""
    seen: list[int] = []
    head = model.get_base_model().get_output_embeddings()
    return seen, head.register_forward_hook(lambda module, args, out: seen.append(args[0].dim()))


def _trained(model, prompts, start, **switches) -> tuple[object, dict[str, torch.Tensor]]:
    """Train the adapter from `start` with the given adaptation switches; (TrainResult, adapter state)."""
    load_adapter_state(model, start)
    settings = AdaptationSettings(epochs=2, batch_size=2, lora_rank=4, **switches)
    result = train_adapter(model, prompts, [TrainingExample(q, a) for q, a in PAIRS * 2], settings, seed=1)
    return result, adapter_state(model)


def test_answer_only_head_setting_runs_the_head_on_answer_rows_and_trains_the_same_adapter(peft_lm):
    model, prompts = peft_lm
    start = adapter_state(model)
    ranks, hook = _head_inputs(model)
    fast, fast_state = _trained(model, prompts, start)
    fast_ranks = set(ranks)
    ranks.clear()
    plain, plain_state = _trained(model, prompts, start, answer_only_head=False)
    hook.remove()
    assert fast_ranks == {2} and set(ranks) == {3}
    assert fast.losses == pytest.approx(plain.losses, rel=1e-5)
    for name in fast_state:
        torch.testing.assert_close(fast_state[name], plain_state[name], rtol=1e-4, atol=1e-5)


def test_fast_lora_backward_setting_switches_peft_lora_path_and_trains_the_same_adapter(peft_lm):
    model, prompts = peft_lm
    start = adapter_state(model)

    def variant_used(switch: bool) -> tuple[set[bool], dict[str, torch.Tensor]]:
        used: set[bool] = set()
        load_adapter_state(model, start)
        settings = AdaptationSettings(epochs=2, batch_size=2, lora_rank=4, fast_lora_backward=switch)
        train_adapter(model, prompts, [TrainingExample(q, a) for q, a in PAIRS * 2], settings, seed=1,
                      on_step=lambda m, _: used.add(any(x.lora_variant for x in m.modules() if hasattr(x, "lora_variant"))))
        return used, adapter_state(model)

    (fast_used, fast), (plain_used, plain) = variant_used(True), variant_used(False)
    assert fast_used == {True} and plain_used == {False}
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-3, atol=1e-4)


def test_fused_adamw_setting_picks_the_optimizer_kernel_and_trains_the_same_adapter(peft_lm):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model, prompts = peft_lm
    start = adapter_state(model)
    fused: list[object] = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: fused.append(optimizer.defaults["fused"]))
    try:
        _, fast = _trained(model, prompts, start)
        fast_kernels = set(fused)
        fused.clear()
        _, plain = _trained(model, prompts, start, fused_adamw=False)
    finally:
        hook.remove()
    assert fast_kernels == {True} and set(fused) == {None}
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-3, atol=1e-4)


def test_math_attention_setting_trains_without_the_fused_attention_kernel_to_the_same_adapter(peft_lm):
    from torch.profiler import ProfilerActivity, profile

    model, prompts = peft_lm
    start = adapter_state(model)
    kernels = {}
    for math_attention in (True, False):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _, trained = _trained(model, prompts, start, math_attention=math_attention)
        kernels[math_attention] = ({e.key for e in prof.key_averages() if "flash_attention" in e.key}, trained)
    (math_ops, math_adapter), (fused_ops, fused_adapter) = kernels[True], kernels[False]
    assert any("backward" in op for op in fused_ops) and not math_ops  # neither the fused kernel nor its backward
    for name in fused_adapter:
        torch.testing.assert_close(math_adapter[name], fused_adapter[name], rtol=1e-3, atol=1e-4)


def test_merge_adapter_setting_scores_without_lora_calls_and_gives_the_same_figures(peft_lm):
    model, prompts = peft_lm
    heldout = [Interaction(0, i, float(i), q, "generic", a, "cooking") for i, (q, a) in enumerate(PAIRS)]
    calls: list[str] = []
    hooks = [m.register_forward_hook(lambda module, args, out: calls.append("lora"))
             for n, m in model.named_modules() if n.endswith("lora_A.p")]
    merged = evaluate(model, prompts, heldout, max_new_tokens=6)
    merged_calls = len(calls)
    unmerged = evaluate(model, prompts, heldout, max_new_tokens=6, merge_adapter=False)
    for h in hooks:
        h.remove()
    assert hooks and merged_calls == 0 and len(calls) > 0
    assert merged.rouge1 == unmerged.rouge1
    assert merged.perplexity == pytest.approx(unmerged.perplexity, rel=1e-4)


SYSTEM_TEMPLATE = (  # a chat template whose every conversation begins with the same system turn
    "<|system|>\nYou are a helpful assistant that answers in one short sentence.{{ eos_token }}\n"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_embed_shared_prefix_runs_the_common_beginning_once_for_the_same_embeddings(tiny_lm):
    import copy
    import os

    model, tokenizer = tiny_lm
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = SYSTEM_TEMPLATE
    prompts = PromptFormat(tokenizer)
    texts = [prompts.conversation(q, a) for q, a in PAIRS] * 2
    tokens: list[int] = []  # tokens the decoder stack runs over, counted at its embedding layer
    hook = model.get_decoder().embed_tokens.register_forward_hook(lambda m, args, out: tokens.append(args[0].numel()))
    whole = LMEmbedder(model, prompts, batch_size=4).embed(texts)
    whole_tokens = sum(tokens)
    tokens.clear()
    shared = LMEmbedder(model, prompts, batch_size=4, shared_prefix=True).embed(texts)
    hook.remove()
    ids = prompts.tokenize(texts)["input_ids"]
    prefix = len(os.path.commonprefix(ids))  # the system turn and the user turn's opening
    assert prefix >= 8 and sum(tokens) == whole_tokens - (len(texts) - 1) * prefix  # run once, not once a text
    np.testing.assert_allclose(shared, whole, rtol=1e-4, atol=1e-4)
    # no common beginning worth a cache (the embedded model's plain template): the texts run whole, as before
    plain = PromptFormat(tiny_lm[1])
    plain_texts = [plain.conversation(q, a) for q, a in PAIRS]
    np.testing.assert_array_equal(LMEmbedder(model, plain, shared_prefix=True).embed(plain_texts),
                                  LMEmbedder(model, plain).embed(plain_texts))
    assert resource_key(load_settings()) != resource_key(load_settings(None, ["selection.embed_shared_prefix=false"]))


def test_embed_without_head_setting_skips_the_vocabulary_head_for_the_same_embeddings(peft_lm):
    model, prompts = peft_lm
    texts = [q for q, _ in PAIRS]
    ranks, hook = _head_inputs(model)
    with model.disable_adapter():
        fast = LMEmbedder(model, prompts).embed(texts)
        fast_calls = len(ranks)
        full = LMEmbedder(model, prompts, without_head=False).embed(texts)
    hook.remove()
    assert fast_calls == 0 and len(ranks) > 0
    np.testing.assert_array_equal(fast, full)
    # a runtime holds one embedder: settings that differ in it need their own runtime
    assert resource_key(load_settings()) != resource_key(load_settings(None, ["selection.embed_without_head=false"]))
