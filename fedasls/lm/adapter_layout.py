"""The global adapter's layout (tensor names and max-rank shapes), known without loading weights.

The server needs the layout to build the seeded initial global adapter and the guard needs it to
check replies; neither should load a base model. The model is instantiated from its config on
torch's meta device (no memory, no weights), wrapped with the same peft LoRA every device uses,
and only the names and shapes of its LoRA tensors are read.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from peft import get_peft_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM

from fedasls.lm.lora import attach_lora
from fedasls.config import Settings
from fedasls.lm.model import ensure_model

Layout = dict[str, tuple[int, ...]]


@lru_cache(maxsize=8)
def _layout(model_dir: str, rank: int, alpha: int, target_modules: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft_model = attach_lora(model, rank, alpha, 0.0, "layout", target_modules)
    state = get_peft_model_state_dict(peft_model, adapter_name="layout")
    return tuple((k, tuple(int(d) for d in v.shape)) for k, v in state.items())


def adapter_layout(settings: Settings) -> Layout:
    """Names and shapes, in peft's order, of a LoRA adapter at the largest rank ([adaptation] lora_rank)."""
    a = settings.adaptation
    model_dir = str(ensure_model(settings.model))
    return dict(_layout(model_dir, a.lora_rank, a.lora_alpha, tuple(a.target_modules)))
