"""Personal LoRA adaptation: training, DP-SGD invariants, adapter swap and save/load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel

from fedasls.pipeline.training import TrainingExample, sequence_loss, train_adapter
from fedasls.lm.lora import (
    adapter_state,
    attach_lora,
    lora_config,
    load_adapter,
    load_adapter_state,
    reset_adapter,
    save_adapter,
)
from fedasls.config import AdaptationSettings
from fedasls.lm.model import generate
from fedasls.lm.prompts import PromptFormat
from fedasls.privacy.accounting import example_level_epsilon

DEVICE_A = [
    TrainingExample("what is my favourite colour?", "my favourite colour is deep blue"),
    TrainingExample("which food do i cook on sundays?", "you cook pasta with basil on sundays"),
    TrainingExample("where do i go running?", "you run in the park by the river"),
    TrainingExample("what city do i live in?", "you live in lisbon near the sea"),
    TrainingExample("what do i drink in the morning?", "you drink green tea every morning"),
    TrainingExample("which book am i reading?", "you are reading dune for the second time"),
    TrainingExample("what is my cat called?", "your cat is called milo"),
    TrainingExample("which season do i like most?", "you like autumn the most"),
    TrainingExample("what music do i play?", "you play jazz piano in the evening"),
    TrainingExample("which game do i play with friends?", "you play chess with friends", weight=2.0),
]
DEVICE_B = [
    TrainingExample("how many push ups do i do?", "you do forty push ups a day"),
    TrainingExample("what bread do i bake?", "you bake sourdough bread on fridays"),
    TrainingExample("which language am i learning?", "you are learning japanese"),
    TrainingExample("when do i sleep?", "you sleep at ten in the evening"),
    TrainingExample("what car do i drive?", "you drive a small red electric car"),
    TrainingExample("what is my job?", "you work as a nurse in a hospital"),
]
PROBE = ["what is my favourite colour?", "what bread do i bake?"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train 10-25x faster on 1 thread than on 2 when the 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(**overrides) -> AdaptationSettings:
    base = dict(lora_rank=8, lora_alpha=16, learning_rate=5e-3, epochs=3, batch_size=4, max_length=64)
    return AdaptationSettings(**{**base, **overrides})


def _fresh(tiny_lm, rank: int = 8) -> PeftModel:
    """A LoRA-wrapped deep copy: the session fixture model is never mutated."""
    model, _ = tiny_lm
    return attach_lora(copy.deepcopy(model), rank=rank, alpha=16, dropout=0.0)


@torch.no_grad()
def _logits(model, prompts: PromptFormat, questions=PROBE) -> torch.Tensor:
    enc = prompts.tokenize([prompts.answer_prompt(q) for q in questions], return_tensors="pt", padding=True)
    model.eval()
    return model(**enc).logits


def _frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_sequence_loss_matches_hugging_face_loss_on_answer_tokens(tiny_lm):
    model, tok = tiny_lm[0], PromptFormat(tiny_lm[1])
    ex = DEVICE_A[0]
    prompt = tok.tokenizer(f"Question: {ex.question}\nAnswer:")["input_ids"]
    answer = tok.tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"] + [tok.tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()
    assert sequence_loss(model, tok, [ex]) == pytest.approx(expected, rel=1e-5)


def test_lora_training_lowers_loss_and_leaves_base_weights_alone(tiny_lm):
    tok = PromptFormat(tiny_lm[1])
    pm = _fresh(tiny_lm)
    frozen = _frozen(pm)
    before = sequence_loss(pm, tok, DEVICE_A)
    result = train_adapter(pm, tok, DEVICE_A, _settings(epochs=4), seed=0)
    after = sequence_loss(pm, tok, DEVICE_A)
    assert after < before - 0.1, (before, after)
    assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]
    assert result.steps == 4 * math.ceil(len(DEVICE_A) / 4)
    assert result.epsilon is None and result.privacy is None
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if "lora_" not in n)
    assert not pm.training


def test_dp_step_invariants(tiny_lm):
    model, tok = tiny_lm[0], PromptFormat(tiny_lm[1])
    pm = _fresh(tiny_lm)
    settings = _settings(dp=True, epochs=2, noise_multiplier=1.0, max_grad_norm=0.5)
    frozen = _frozen(pm)
    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in pm.modules())
    seen: list[dict[str, tuple[int, bool]]] = []

    def check(peft_model, step):
        record = {}
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                assert getattr(p, "grad_sample", None) is None and p.grad is None, name
                continue
            gs = getattr(p, "grad_sample", None)
            assert gs is not None, f"no per-example gradient for {name} at step {step}"
            assert gs.shape[1:] == p.shape
            # opacus (mean reduction): per-example grads average to the batch gradient.
            consistent = p.grad is None if len(gs) == 0 else torch.allclose(gs.mean(0), p.grad, atol=1e-6, rtol=1e-4)
            record[name] = (len(gs), consistent)
        seen.append(record)

    result = train_adapter(pm, tok, DEVICE_A, settings, seed=3, on_step=check)

    assert len(seen) == result.steps == 2 * math.ceil(len(DEVICE_A) / 4)
    assert all(set(r) == set(trainable) for r in seen)  # every trainable parameter, every step
    assert all(ok for r in seen for _, ok in r.values())
    assert any(n > 0 for r in seen for n, _ in r.values())  # at least one non-empty Poisson batch
    # LoRA changed, frozen base bit-exact, opacus fully detached, model still generates.
    assert all(not torch.equal(p, lora_before[n]) for n, p in pm.named_parameters() if "lora_" in n)
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if "lora_" not in n)
    assert isinstance(pm, PeftModel)
    assert not any(hasattr(p, "grad_sample") for p in pm.parameters())
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in pm.modules()) == hooks_before
    assert len(generate(pm, tok, [PROBE[0]], max_new_tokens=3)) == 1
    # Base model of the session untouched.
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_dp_empty_poisson_batches_take_a_noise_only_step(tiny_lm):
    # 2 examples, Poisson rate 1/2: a quarter of the steps sample nobody. Those steps must still run
    # (noise only) and be accounted, not crash the Llama forward nor be skipped.
    tok = PromptFormat(tiny_lm[1])
    pm = _fresh(tiny_lm)
    sizes: list[int] = []

    def record(peft_model, step):
        sizes.append(len(next(p for p in peft_model.parameters() if p.requires_grad).grad_sample))

    result = train_adapter(pm, tok, DEVICE_A[:2], _settings(dp=True, batch_size=1, epochs=4), seed=0, on_step=record)
    assert 0 in sizes and len(sizes) == result.steps == 8 == result.privacy.steps
    assert result.epsilon == pytest.approx(example_level_epsilon(1.0, 0.5, 8, 1e-5).epsilon)


def test_dp_epsilon_reported_finite_and_larger_for_less_noise(tiny_lm):
    tok = PromptFormat(tiny_lm[1])
    results = {}
    for sigma in (0.7, 2.0):
        pm = _fresh(tiny_lm)
        results[sigma] = train_adapter(pm, tok, DEVICE_A, _settings(dp=True, epochs=1, noise_multiplier=sigma), seed=1)
    for sigma, r in results.items():
        assert r.sample_rate == pytest.approx(1 / math.ceil(len(DEVICE_A) / 4))  # Poisson rate 1/batches
        assert r.steps == math.ceil(len(DEVICE_A) / 4)
        assert r.epsilon is not None and math.isfinite(r.epsilon) and r.epsilon > 0
        assert r.epsilon == pytest.approx(example_level_epsilon(sigma, r.sample_rate, r.steps, 1e-5).epsilon)
        assert (r.delta, r.noise_multiplier) == (1e-5, sigma)
        text = str(r.privacy)
        assert "poisson" in text and "add/remove" in text and "delta = 1e-05" in text
    assert results[0.7].epsilon > results[2.0].epsilon


def test_training_is_deterministic_per_seed(tiny_lm):
    tok = PromptFormat(tiny_lm[1])
    settings = _settings(dp=True, epochs=1)
    states = []
    for seed in (5, 5, 6):
        pm = _fresh(tiny_lm)
        reset_adapter(pm, seed)
        train_adapter(pm, tok, DEVICE_B, settings, seed=seed)
        states.append(adapter_state(pm))
    same = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    differ = any(not torch.equal(states[0][k], states[2][k]) for k in states[0])
    assert same and differ


def test_adapter_swap_on_one_base_model(tiny_lm):
    model, tok = tiny_lm[0], PromptFormat(tiny_lm[1])
    pm = _fresh(tiny_lm)
    reset_adapter(pm, seed=11)
    fresh = adapter_state(pm)
    assert all(torch.count_nonzero(v) == 0 for k, v in fresh.items() if "lora_B" in k)
    assert torch.equal(_logits(pm, tok), _logits(model, tok))  # B = 0: the base model's logits

    train_adapter(pm, tok, DEVICE_A, _settings(epochs=2), seed=1)
    state_a, logits_a = adapter_state(pm), _logits(pm, tok)
    reset_adapter(pm, seed=12)
    train_adapter(pm, tok, DEVICE_B, _settings(epochs=2), seed=2)
    state_b, logits_b = adapter_state(pm), _logits(pm, tok)
    assert not torch.allclose(logits_a, logits_b)

    for state, expected in ((state_a, logits_a), (state_b, logits_b), (state_a, logits_a)):
        load_adapter_state(pm, state)
        assert torch.equal(_logits(pm, tok), expected)
    reset_adapter(pm, seed=11)
    assert all(torch.equal(fresh[k], v) for k, v in adapter_state(pm).items())


def test_dp_training_of_one_slot_leaves_other_adapter_slots_alone(tiny_lm):
    # A worker keeps one adapter slot per LoRA rank in one PeftModel (fedasls.device.worker).
    tok = PromptFormat(tiny_lm[1])
    pm = _fresh(tiny_lm, rank=8)
    pm.add_adapter("slot-r4", lora_config(4, 16, 0.0))
    pm.set_adapter("slot-r4")
    r8_before = {n: p.detach().clone() for n, p in pm.named_parameters() if ".personal." in n}
    r4_before = {n: p.detach().clone() for n, p in pm.named_parameters() if ".slot-r4." in n}
    result = train_adapter(pm, tok, DEVICE_B, _settings(dp=True, epochs=1), seed=0)
    assert result.epsilon is not None
    params = dict(pm.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in r8_before.items())
    assert all(not torch.equal(params[n], v) for n, v in r4_before.items())
    cfg = tiny_lm[0].config
    shapes = {tuple(v.shape) for k, v in adapter_state(pm).items() if "lora_A" in k}
    assert shapes == {(4, cfg.hidden_size), (4, cfg.intermediate_size)}  # the active rank-4 slot


def test_adapter_save_load_round_trip(tiny_lm, tmp_path):
    model, tok = tiny_lm[0], PromptFormat(tiny_lm[1])
    pm = _fresh(tiny_lm)
    train_adapter(pm, tok, DEVICE_A, _settings(epochs=1), seed=4)
    expected = _logits(pm, tok)
    folder = save_adapter(pm, tmp_path / "device-7")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    restored = load_adapter(copy.deepcopy(model), tmp_path / "device-7")
    assert isinstance(restored, PeftModel)
    assert torch.equal(_logits(restored, tok), expected)

    other = _fresh(tiny_lm)  # swap path: same adapter name already attached
    assert not torch.equal(_logits(other, tok), expected)
    assert load_adapter(other, folder) is other
    assert torch.equal(_logits(other, tok), expected)


def test_bad_inputs_raise_clear_errors(tiny_lm, tmp_path):
    tok = PromptFormat(tiny_lm[1])
    pm8 = _fresh(tiny_lm, rank=8)
    pm4 = _fresh(tiny_lm, rank=4)
    with pytest.raises(ValueError, match="LoRA rank"):
        load_adapter_state(pm8, adapter_state(pm4))
    with pytest.raises(ValueError, match="no training examples"):
        train_adapter(pm8, tok, [], _settings(), seed=0)
    with pytest.raises(ValueError, match=r"examples\[0\]\.weight"):
        train_adapter(pm8, tok, [TrainingExample("q?", "a", weight=0.0)], _settings(), seed=0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(pm8, tmp_path)
    with pytest.raises(ValueError, match="Linear modules are named"):
        attach_lora(copy.deepcopy(tiny_lm[0]), 4, 8, 0.0, target_modules=("nonexistent_proj",))
