"""Per-process resources that every device on a worker shares.

A worker loads the base model once and wraps it once with peft; devices are data + state, so
running a device means swapping its LoRA tensors into the shared wrapper (one adapter slot per
LoRA rank, since heterogeneous devices train different ranks). Nothing here is per-device.
"""

from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
from peft import PeftModel

from fedasls.adaptation import attach_lora, lora_config
from fedasls.config import Settings
from fedasls.embedding import Embedder, make_embedder
from fedasls.interaction import Interaction
from fedasls.lexicon import DomainLexicons, default_lexicons
from fedasls.model import ensure_model, load_model
from fedasls.population import Population, population_from_settings
from fedasls.prompts import PromptFormat
from fedasls.synthesis import ParaphraseProbe, probe_paraphrase


def slot_name(rank: int) -> str:
    """The peft adapter name that holds devices of LoRA rank `rank`."""
    return f"personal-r{rank}"


class DeviceRuntime:
    """Base model (loaded once), tokenizer and its prompt format, LoRA slots, embedder, lexicons, population."""

    def __init__(self, settings: Settings, population: Population | None = None) -> None:
        self.settings = settings
        self.population = population if population is not None else population_from_settings(settings.population)
        base, self.tokenizer = load_model(ensure_model(settings.model))
        self.prompts = PromptFormat(self.tokenizer)  # every prompt of this model is made here
        a = settings.adaptation
        self.model: PeftModel = attach_lora(
            base, a.lora_rank, a.lora_alpha, a.lora_dropout, slot_name(a.lora_rank), a.target_modules
        )
        self.model.eval()

    @cached_property
    def lexicons(self) -> DomainLexicons:
        """Domain lexicons of the population (its own, for labelled real data), else the default."""
        own = getattr(self.population, "lexicons", None)
        return own if isinstance(own, DomainLexicons) else default_lexicons(self.settings.population.seed)

    @cached_property
    def embedder(self) -> Embedder:
        s = self.settings.selection
        return make_embedder(s.embedding, self.model, self.prompts, s.embed_batch_size)

    @cached_property
    def paraphrase_probe(self) -> ParaphraseProbe:
        """How well the base model paraphrases (fixed probe questions, seeded): measured once per worker."""
        with self.base_model() as base:
            return probe_paraphrase(base, self.prompts, self.settings.synthesis, self.settings.synthesis.rewrites or 3)

    def can_paraphrase(self) -> bool | None:
        """The once-per-model verdict synthesis "auto" needs; None when "auto" is not in use."""
        s = self.settings.synthesis
        if s.method != "auto":
            return None
        return self.paraphrase_probe.can_paraphrase if s.rewrites else False

    def embed(self, texts: list[str]) -> np.ndarray:
        """Selection embeddings from the *base* model (adapters off), so they stay comparable over time."""
        with self.base_model():
            return self.embedder.embed(texts)

    def embed_interactions(self, interactions: list[Interaction]) -> np.ndarray:
        """Selection embeddings of interactions, each as its embedder's text (`Embedder.text`)."""
        return self.embed([self.embedder.text(it) for it in interactions])

    def activate(self, rank: int) -> PeftModel:
        """Make the rank-`rank` adapter slot active (adding it on first use) and return the model."""
        name = slot_name(rank)
        if name not in self.model.peft_config:
            a = self.settings.adaptation
            self.model.add_adapter(name, lora_config(rank, a.lora_alpha, a.lora_dropout, a.target_modules))
        self.model.set_adapter(name)
        return self.model

    @contextlib.contextmanager
    def base_model(self) -> Iterator[PeftModel]:
        """The shared model with every adapter disabled (the base model's behaviour)."""
        with self.model.disable_adapter(), torch.no_grad():
            yield self.model
