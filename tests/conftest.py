"""Shared fixtures: a tiny real model built once per test session (no downloads), the one settings
factory on it, and a worker runtime per test module.

Tiers (markers registered in pyproject.toml): `python -m pytest -m "not slow and not integration"`
is the quick loop; CI runs everything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedasls.config import ModelSettings, Settings

torch.set_num_threads(1)

TINY_MODEL = ModelSettings(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    max_positions=192,
    pretrain_steps=30,
    pretrain_batch_size=16,
    corpus_size=400,
    seed=0,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Hugging Face folder of the embedded default architecture, built small and fast."""
    from fedasls.lm.model import build_default_model

    return build_default_model(TINY_MODEL, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path):
    """(model, tokenizer) loaded from the tiny folder. Tests must not mutate its weights."""
    from fedasls.lm.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def make_settings(tiny_model_dir: Path):
    """The one settings factory: `make_settings(section={key: value}, ...)` on the tiny model."""

    def make(**sections) -> Settings:
        return Settings.model_validate({"model": {"path": str(tiny_model_dir)}, **sections})

    return make


@pytest.fixture(scope="module")
def runtime(settings: Settings):
    """A worker runtime (base model loaded once, adapters swapped per device) for the module's `settings`."""
    from fedasls.device.worker import DeviceRuntime

    return DeviceRuntime(settings)
