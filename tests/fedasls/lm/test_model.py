"""Tests for fedasls.lm.model: building, caching, loading, generation and embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import ViTConfig, ViTModel

from fedasls.config import ModelSettings
from fedasls.lm.prompts import PromptFormat
from fedasls.lm.model import (
    BUILD_INFO,
    ModelNotFoundError,
    build_default_model,
    default_model_dir,
    embed_last_token,
    ensure_model,
    eval_mode,
    generate,
    load_model,
)

MICRO = ModelSettings(
    vocab_size=300,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_positions=64,
    pretrain_steps=4,
    pretrain_batch_size=4,
    corpus_size=120,
    seed=0,
)

QUESTIONS = ["How long should I rest between workouts?", "What should I cook tonight?"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer([text], return_tensors="pt")).logits


def test_default_model_generates_new_nonempty_text(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    prompts = PromptFormat(tokenizer)
    outs = generate(model, prompts, QUESTIONS, max_new_tokens=12)
    assert len(outs) == len(QUESTIONS)
    for out, question in zip(outs, QUESTIONS):
        assert isinstance(out, str) and out.strip() == out and out
        assert "Question:" not in out and not out.startswith(prompts.answer_prompt(question))


def test_batched_generation_matches_one_prompt_at_a_time(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    prompts = PromptFormat(tokenizer)
    questions = ["hi", "How do I plan a week of healthy dinners on a budget?"]
    batched = generate(model, prompts, questions, max_new_tokens=10, batch_size=2)
    single = [generate(model, prompts, [q], max_new_tokens=10)[0] for q in questions]
    assert batched == single


def test_inference_restores_the_callers_mode_and_loads_no_hub_kernels(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.use_kernels  # transformers 5 would otherwise kernelize from the Hub (a download)
    prompts = PromptFormat(tokenizer)
    model.train()
    generate(model, prompts, QUESTIONS[:1], max_new_tokens=4)
    embed_last_token(model, prompts, ["Pack light."])
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    with eval_mode(model):
        pass
    assert not any(m.training for m in model.modules())


def test_pretraining_lowers_loss(tiny_model_dir: Path) -> None:
    info = json.loads((tiny_model_dir / BUILD_INFO).read_text())
    assert info["loss_end"] < info["loss_start"] - 0.5
    assert info["settings"]["hidden_size"] == 64
    assert info["num_parameters"] > 0


def test_build_is_deterministic_per_seed_and_atomic(tmp_path: Path) -> None:
    a = build_default_model(MICRO, tmp_path / "a")
    b = build_default_model(MICRO, tmp_path / "b")
    c = build_default_model(MICRO.model_copy(update={"seed": 1}), tmp_path / "c")
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    # rebuilding into an existing folder replaces it and leaves no temporary folders behind
    (a / "stale.txt").write_text("old")
    build_default_model(MICRO, a)
    assert not (a / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_save_load_round_trip_keeps_logits(tiny_lm, tmp_path: Path) -> None:
    model, tokenizer = tiny_lm
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model2, tokenizer2 = load_model(tmp_path)
    text = PromptFormat(tokenizer).answer_prompt("Where can I hike near the coast?") + " Try the cliff path."
    assert tokenizer2(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert torch.equal(_logits(model, tokenizer, text), _logits(model2, tokenizer2, text))
    assert not model2.training and tokenizer2.pad_token is not None and tokenizer2.padding_side == "left"


def test_load_model_errors_name_what_is_expected(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        load_model(tmp_path / "nope")
    assert "config.json" in str(err.value) and "--model" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(empty)

    # a real Hugging Face folder, complete with tokenizer, but of a vision encoder
    vision = tmp_path / "vision"
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(vision)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (vision / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ModelNotFoundError, match="not a causal language model"):
        load_model(vision)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(no_weights)


def test_embed_last_token_shape_and_padding_invariance(tiny_lm) -> None:
    model, prompts = tiny_lm[0], PromptFormat(tiny_lm[1])
    short = "Boil the pasta."
    long = "Stretch after every run, drink water, and sleep eight hours before a long race day."
    batch = embed_last_token(model, prompts, [short, long, short], batch_size=3)
    alone = embed_last_token(model, prompts, [short])
    assert batch.shape == (3, model.config.hidden_size) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(batch[0], batch[2], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)
    assert embed_last_token(model, prompts, []).shape == (0, model.config.hidden_size)


def test_peft_wrapped_model_generates_and_embeds(tiny_model_dir: Path) -> None:
    base, tok = load_model(tiny_model_dir)
    prompts = PromptFormat(tok)
    want_gen = generate(base, prompts, QUESTIONS, max_new_tokens=8)
    want_emb = embed_last_token(base, prompts, ["Pack light for the trip."])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # LoRA B starts at zero, so the wrapped model must behave exactly like the base one
    assert generate(peft_model, prompts, QUESTIONS, max_new_tokens=8) == want_gen
    got_emb = embed_last_token(peft_model, prompts, ["Pack light for the trip."])
    np.testing.assert_allclose(got_emb, want_emb, atol=1e-6)


def test_ensure_model_builds_once_then_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = MICRO.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    first = ensure_model(settings)
    assert first == default_model_dir(settings) and first.parent == (tmp_path / "cache").resolve()
    stamp = (first / BUILD_INFO).stat().st_mtime_ns
    second = ensure_model(settings)
    assert second == first and (first / BUILD_INFO).stat().st_mtime_ns == stamp
    # a changed architecture gets its own folder; the cache root follows FEDASLS_CACHE
    assert default_model_dir(settings.model_copy(update={"hidden_size": 64})) != first
    monkeypatch.setenv("FEDASLS_CACHE", str(tmp_path / "env"))
    assert default_model_dir(MICRO).parent == (tmp_path / "env").resolve()
    # an explicit path is validated and returned as is
    assert ensure_model(MICRO.model_copy(update={"path": str(first)})) == first
    with pytest.raises(ModelNotFoundError):
        ensure_model(MICRO.model_copy(update={"path": str(tmp_path / "missing")}))
