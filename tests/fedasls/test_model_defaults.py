"""Adaptation defaults follow the model: a real chat LLM given by path gets the real-LLM profile
(as its preset does), a small folder without a chat template the embedded model's; keys the user
sets always win."""

from __future__ import annotations

import json
from pathlib import Path

from fedasls.config import REAL_LLM_ADAPTATION, Settings, defaults_line
from fedasls.model_folder import model_folder_facts

SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152,
                  "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                  "tie_word_embeddings": True}


def _folder(tmp_path: Path, config: dict, chat_template: str | None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template} if chat_template else {}))
    return folder


def test_the_parameter_estimate_of_smollm2_is_its_published_size(tmp_path):
    facts = model_folder_facts(_folder(tmp_path, SMOLLM2_CONFIG, "{{ messages }}"))
    assert abs(facts.parameters - 134.5e6) < 0.5e6 and facts.chat_template and facts.real_llm


def test_a_chat_model_given_by_path_gets_the_real_llm_profile(tmp_path):
    folder = _folder(tmp_path, SMOLLM2_CONFIG, "{{ messages }}")
    a = Settings.model_validate({"model": {"path": str(folder)}}).adaptation
    assert a.target_modules == REAL_LLM_ADAPTATION["target_modules"] and a.learning_rate == 1e-3
    assert a.max_length == 128 and a.epochs == 3
    preset = Settings.model_validate({"model": {"preset": "smollm2-135m-instruct"}}).adaptation
    assert a == preset  # by path or by preset: the same profile
    mine = Settings.model_validate({"model": {"path": str(folder)}, "adaptation": {"learning_rate": 2e-4}}).adaptation
    assert mine.learning_rate == 2e-4 and mine.max_length == 128  # the user's key wins, the rest is the profile
    line = defaults_line(Settings.model_validate({"model": {"path": str(folder)}}))
    assert "134.5M parameters, chat template yes" in line and "real-LLM profile" in line


def test_a_small_model_without_a_chat_template_keeps_the_embedded_defaults(tiny_model_dir):
    a = Settings.model_validate({"model": {"path": str(tiny_model_dir)}}).adaptation
    assert a == Settings().adaptation
    assert "embedded-model profile" in defaults_line(Settings.model_validate({"model": {"path": str(tiny_model_dir)}}))
    assert defaults_line(Settings()) is None
