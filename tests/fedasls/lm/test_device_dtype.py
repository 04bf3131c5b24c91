"""The accelerator plumbing, exercised on whatever this machine has: model.device and model.dtype
reach the loaded model, a missing GPU is a clear error, and Ray reserves the GPU share per worker."""

from __future__ import annotations

import pytest
import torch

from fedasls.config import Settings, settings_warnings
from fedasls.errors import FedaslsError
from fedasls.lm.model import load_model, resolve_device
from simulations.runner import backend_config, plan_workers


def test_dtype_reaches_the_weights_and_the_model_still_generates(tiny_model_dir):
    from fedasls.lm.model import generate
    from fedasls.lm.prompts import PromptFormat

    model, tokenizer = load_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    answers = generate(model, PromptFormat(tokenizer), ["how do I water tomatoes?"], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_auto_picks_the_gpu_when_there_is_one_and_cuda_without_one_is_refused(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(FedaslsError, match="sees no CUDA device here.*model.device='auto'"):
            load_model(tiny_model_dir, device="cuda")


def test_ray_reserves_the_gpu_share_of_each_worker_and_a_gpu_without_a_share_is_warned_about():
    settings = Settings.model_validate({"model": {"device": "auto"},
                                        "simulation": {"gpus_per_worker": 0.25, "devices_per_worker": 2}})
    config = backend_config(settings, plan_workers(settings))
    assert config["client_resources"]["num_gpus"] == 0.5  # two devices side by side, a quarter card each
    assert backend_config(Settings(), plan_workers(Settings()))["client_resources"]["num_gpus"] == 0.0
    assert any("gpus_per_worker = 0" in w for w in settings_warnings(Settings.model_validate({"model": {"device": "cuda"}})))
    assert not settings_warnings(settings)
