"""Test helper: the settings of a tiny synthetic fleet (6 devices on the tiny model) for real Flower runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedasls.config import Settings


def tiny_fleet_settings(tiny_model_dir: Path, *, federated: dict[str, Any], simulation: dict[str, Any]) -> Settings:
    """6 synthetic devices (stream 30, 2 held-out), one short epoch of rank-4 LoRA, 8 new tokens, every device
    always available and never dropping out, the global-adapter strategy; `federated` and `simulation` add
    to their tables."""
    return Settings.model_validate({
        "model": {"path": str(tiny_model_dir)},
        "population": {"num_devices": 6, "stream_length": 30, "heldout": 2},
        "synthesis": {"rewrites": 1, "method": "fallback"},
        "adaptation": {"epochs": 1, "lora_rank": 4, "min_new_items": 2},
        "evaluation": {"max_new_tokens": 8},
        "heterogeneity": {"availability": "always", "dropout_scale": 0.0},
        "federated": {"strategy": "global", **federated},
        "simulation": simulation,
    })
