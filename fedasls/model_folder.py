"""What a local Hugging Face model folder is, read from its JSON files alone (no torch, no weights).

Settings use it to pick adaptation defaults by the model's kind and size: a real chat LLM given by
path gets the real-LLM profile, a small model without a chat template the embedded model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REAL_LLM_MIN_PARAMETERS = 20_000_000  # above this a model is treated as a real LLM (the embedded one is ~0.7M)


@dataclass(frozen=True)
class ModelFolderFacts:
    """A folder's model type, its parameter count estimated from config.json, and whether its
    tokenizer has a chat template."""

    model_type: str
    parameters: int
    chat_template: bool

    @property
    def real_llm(self) -> bool:
        return self.chat_template or self.parameters >= REAL_LLM_MIN_PARAMETERS


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def estimated_parameters(config: dict) -> int:
    """Parameters of a Llama-style decoder from its config: embeddings (x2 when untied) plus per layer
    the attention (q, o full; k, v by the key-value heads' share) and the gated MLP (3 matrices)."""
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    vocab = int(config.get("vocab_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or 1)
    kv_share = int(config.get("num_key_value_heads") or heads) / max(heads, 1)
    attention = hidden * hidden * (2 + 2 * kv_share)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return int(embeddings + layers * (attention + 3 * hidden * inter))


def model_folder_facts(path: str | Path) -> ModelFolderFacts | None:
    """The facts of a model folder, or None when it holds no readable config.json."""
    folder = Path(path)
    config = _read_json(folder / "config.json")
    if not config:
        return None
    tokenizer = _read_json(folder / "tokenizer_config.json")
    chat = bool(tokenizer.get("chat_template")) or (folder / "chat_template.jinja").is_file() \
        or (folder / "chat_template.json").is_file()
    return ModelFolderFacts(str(config.get("model_type", "?")), estimated_parameters(config), chat)
