"""peft LoRA glue: attach one adapter wrapper to a base model, and move adapter weights in and out.

A worker process loads ONE base model, wraps it ONCE with `attach_lora`, and per device swaps the
adapter weights in and out as plain state dicts (`adapter_state` / `load_adapter_state`), or starts a
device from a seeded fresh adapter (`reset_adapter`). Only the LoRA matrices move (peft's
get/set_peft_model_state_dict); the base weights are never copied or touched. `save_adapter` /
`load_adapter` use peft's own folder format.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights
from transformers import PreTrainedModel

ATTENTION_QV: tuple[str, ...] = ("q_proj", "v_proj")
LLAMA_ALL_LINEAR: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# All linear projections of a Llama block: on the small default model, q/v-only LoRA barely moves
# the answer loss in a few epochs (5.25 -> 5.16 nats), all-linear does (5.25 -> 5.00).
DEFAULT_TARGET_MODULES: tuple[str, ...] = LLAMA_ALL_LINEAR


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`; hide that one warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_config(
    rank: int, alpha: float, dropout: float, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
) -> LoraConfig:
    """The peft LoraConfig every adapter uses (causal LM, no bias); also for `PeftModel.add_adapter`.

    `target_modules` are module-name suffixes of a Llama-style model: LLAMA_ALL_LINEAR (default)
    or ATTENTION_QV, or any other list of Linear module names.
    """
    if rank < 1 or alpha <= 0 or not (0.0 <= dropout < 1.0):
        raise ValueError(
            f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank={rank}, alpha={alpha}, "
            f"dropout={dropout} (set [adaptation] lora_rank / lora_alpha / lora_dropout)"
        )
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
    )


def attach_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: int,
    dropout: float,
    adapter_name: str = "personal",
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> PeftModel:
    """Wrap `model` IN PLACE with a fresh LoRA adapter (A random, B zero); base weights are frozen.

    Do this once per process; deep-copy `model` first if the caller still needs it unwrapped.
    """
    config = lora_config(rank, alpha, dropout, target_modules)
    try:
        with _quiet_peft():
            return get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"attach_lora: target_modules {list(target_modules)} do not match this model ({err}); "
            f"its Linear modules are named {linear}"
        ) from None


def _adapter_name(peft_model: PeftModel, adapter_name: str | None) -> str:
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise KeyError(f"adapter '{name}' is not attached; attached: {sorted(peft_model.peft_config)}")
    return name


def adapter_state(peft_model: PeftModel, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors (peft key names, adapter name stripped), CLONED on CPU.

    Cloning matters: peft returns views of the live parameters, which later training would
    overwrite in the stored "state".
    """
    name = _adapter_name(peft_model, adapter_name)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_adapter_state(
    peft_model: PeftModel, state: dict[str, torch.Tensor], adapter_name: str | None = None
) -> None:
    """Put `state` (from `adapter_state`) into the attached adapter; shapes/keys must match exactly."""
    name = _adapter_name(peft_model, adapter_name)
    try:
        with torch.no_grad():
            result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    except RuntimeError as err:  # size mismatch
        raise ValueError(
            f"load_adapter_state: the state does not fit adapter '{name}' ({str(err).splitlines()[1].strip()}); "
            "it was trained with another LoRA rank: attach the adapter with that rank"
        ) from None
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"load_adapter_state: the state does not match adapter '{name}' (missing {missing[:2]}, "
            f"unexpected {list(result.unexpected_keys)[:2]}); it was saved with other target modules: attach the "
            "adapter with the same target_modules. The adapter is now partly loaded: "
            "reset_adapter or load a valid state"
        )


@contextmanager
def seeded(seed: int, model: torch.nn.Module | None = None) -> Iterator[None]:
    """Seed torch's RNGs inside the block and restore the caller's RNG state afterwards."""
    devices = []
    if model is not None:
        dev = next(model.parameters()).device
        if dev.type == "cuda":
            devices = [dev]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def reset_adapter(peft_model: PeftModel, seed: int, adapter_name: str | None = None) -> None:
    """Fresh LoRA init for a new device: A ~ peft's kaiming-uniform (deterministic per seed), B = 0."""
    name = _adapter_name(peft_model, adapter_name)
    with seeded(seed, peft_model), torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                module.reset_lora_parameters(name, init_lora_weights=True)


def shrink_adapter(
    trained: Mapping[str, torch.Tensor], scale: float, start: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The trained adapter with its update pulled toward `start` by `scale` (1 = as trained).

    Only the lora_B matrices move: B' = B0 + scale * (B - B0), with B0 = 0 for a fresh adapter
    (whose update B @ A is then scaled exactly by `scale`) or the start adapter's B (e.g. the global
    adapter). lora_A is kept as trained. New tensors; `trained` is not changed.
    """
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"shrink_adapter: scale must be in [0, 1], got {scale}")
    out = {}
    for key, value in trained.items():
        if "lora_B" in key and scale != 1.0:
            origin = start[key].to(value.dtype) if start is not None else torch.zeros_like(value)
            out[key] = origin + scale * (value - origin)
        else:
            out[key] = value.clone()
    return out


def adapters_enabled(peft_model: PeftModel) -> bool:
    """False inside peft's `disable_adapter()` (the base model's behaviour), else True."""
    layer = next((m for m in peft_model.modules() if isinstance(m, LoraLayer)), None)
    return layer is None or not layer.disable_adapters


def set_adapters_enabled(peft_model: PeftModel, enabled: bool) -> None:
    """Turn every LoRA layer on or off, and peft's own flag with them (what `disable_adapter()` does on entry
    and exit; mixed-adapter batches run only while the flag says enabled)."""
    if enabled:
        peft_model.base_model.enable_adapter_layers()
    else:
        peft_model.base_model.disable_adapter_layers()
    peft_model._adapters_disabled = not enabled


def save_adapter(peft_model: PeftModel, directory: str | Path, adapter_name: str | None = None) -> Path:
    """Save one adapter in peft's format (adapter_config.json + adapter_model.safetensors).

    Returns the folder holding the files (peft puts a non-"default" adapter in a sub-folder
    named after it).
    """
    name = _adapter_name(peft_model, adapter_name)
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), selected_adapters=[name])
    return directory if name == "default" else directory / name


def _adapter_dir(directory: str | Path, adapter_name: str) -> Path:
    d = Path(directory)
    for candidate in (d, d / adapter_name):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no peft adapter in {d} (looked for adapter_config.json there and in {d / adapter_name}); "
        "pass the folder written by save_adapter"
    )


def load_adapter(
    base_or_peft_model: PreTrainedModel | PeftModel,
    directory: str | Path,
    adapter_name: str = "personal",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved adapter. On a PeftModel that already has `adapter_name`, the weights are
    swapped in (no new modules); on a PeftModel without it, the adapter is added and activated;
    on a plain base model, a PeftModel is created (the base is wrapped in place)."""
    folder = _adapter_dir(directory, adapter_name)
    if isinstance(base_or_peft_model, PeftModel):
        model = base_or_peft_model
        if adapter_name in model.peft_config:
            load_adapter_state(model, load_peft_weights(str(folder)), adapter_name)
        else:
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
        model.set_adapter(adapter_name)
        return model
    with _quiet_peft():
        return PeftModel.from_pretrained(
            base_or_peft_model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable
        )
