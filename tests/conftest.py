"""Shared fixtures: a tiny real model built once per test session (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedasls.config import ModelSettings

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
