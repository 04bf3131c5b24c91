"""Per-process resources that every device on a worker shares.

A worker loads the base model once and wraps it once with peft; devices are data + state, so
running a device means swapping its LoRA tensors into the shared wrapper (one adapter slot per
LoRA shape, since heterogeneous devices train different ranks). Nothing here is per-device, and
no run settings live here: a device gets its `Settings` as an argument. The runtime is keyed by
what it loads (`resource_key`: model, population, embedder), so devices whose settings differ
only in, say, the learning rate or the selection policy share one runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
from peft import PeftModel

from fedasls.lm.lora import attach_lora, lora_config
from fedasls.config import AdaptationSettings, Settings, SynthesisSettings
from fedasls.lm.embedding import Embedder, make_embedder
from fedasls.interaction import Interaction
from fedasls.data.lexicon import DomainLexicons, default_lexicons
from fedasls.lm.model import ensure_model, load_model
from fedasls.data.population import Population
from fedasls.data.sources import population_from_settings
from fedasls.lm.prompts import PromptFormat
from fedasls.pipeline.synthesis import ParaphraseProbe, probe_paraphrase
from fedasls.device.batched import lane_suffix
from fedasls.device.timing import stage


def resource_key(settings: Settings) -> str:
    """What a runtime loads for these settings (model, population, selection embedder), as a hash."""
    s = settings.selection
    loads = {
        "model": settings.model.model_dump(mode="json"),
        "population": settings.population.model_dump(mode="json"),
        "embedding": [s.embedding, s.embed_batch_size, s.embed_without_head, s.embed_shared_prefix],
    }
    return hashlib.sha256(json.dumps(loads, sort_keys=True).encode()).hexdigest()[:16]


def slot_name(rank: int, adaptation: AdaptationSettings) -> str:
    """The peft adapter name that holds devices of LoRA rank `rank` with this LoRA shape."""
    shape = json.dumps([adaptation.alpha_for(rank), adaptation.lora_dropout, sorted(adaptation.target_modules)])
    return f"personal-r{rank}-{hashlib.sha256(shape.encode()).hexdigest()[:8]}"


class DeviceRuntime:
    """Base model (loaded once), tokenizer and its prompt format, LoRA slots, embedder, lexicons, population."""

    def __init__(self, settings: Settings, population: Population | None = None) -> None:
        self.key = resource_key(settings)
        self._population_seed = settings.population.seed
        self._selection = settings.selection
        self.population = population if population is not None else population_from_settings(settings.population)
        base, self.tokenizer = load_model(ensure_model(settings.model), settings.model.device, settings.model.dtype)
        self.prompts = PromptFormat(self.tokenizer)  # every prompt of this model is made here
        self._paraphrase_probes: dict[tuple[float, float], ParaphraseProbe] = {}
        a = settings.adaptation
        self.model: PeftModel = attach_lora(
            base, a.lora_rank, a.lora_alpha, a.lora_dropout, slot_name(a.lora_rank, a), a.target_modules
        )
        self.model.eval()

    def check(self, settings: Settings) -> None:
        """Raise ValueError if `settings` need other shared resources than this runtime holds."""
        if resource_key(settings) != self.key:
            raise ValueError(
                "these settings need another model, population or embedder than this DeviceRuntime loaded "
                "([model], [population] or selection.embedding, embed_batch_size, embed_without_head differ): build a DeviceRuntime for them"
            )

    @cached_property
    def lexicons(self) -> DomainLexicons:
        """Domain lexicons of the population (its own, for labelled real data), else the default."""
        own = getattr(self.population, "lexicons", None)
        if isinstance(own, DomainLexicons):
            return own
        with stage("worker_setup"):  # built on a worker's first device round, then shared by all its devices
            return default_lexicons(self._population_seed)

    @cached_property
    def embedder(self) -> Embedder:
        s = self._selection
        return make_embedder(s.embedding, self.model, self.prompts, s.embed_batch_size, s.embed_without_head,
                             s.embed_shared_prefix)

    def paraphrase_probe(self, synthesis: SynthesisSettings) -> ParaphraseProbe:
        """How well the base model paraphrases (fixed probe questions, seeded, 3 rewrites each),
        under these filter bounds: measured once per worker and filter, then reused."""
        key = (synthesis.rouge_min, synthesis.rouge_max)
        if key not in self._paraphrase_probes:
            # once per worker (and filter), like loading the model: worker set-up, not a device's work
            with stage("worker_setup"), self.base_model() as base:
                self._paraphrase_probes[key] = probe_paraphrase(base, self.prompts, synthesis)
        return self._paraphrase_probes[key]

    def can_paraphrase(self, synthesis: SynthesisSettings) -> bool | None:
        """The once-per-model verdict synthesis "auto" needs; None when "auto" is not in use."""
        if synthesis.method != "auto":
            return None
        return self.paraphrase_probe(synthesis).can_paraphrase if synthesis.rewrites else False

    def embed(self, texts: list[str]) -> np.ndarray:
        """Selection embeddings from the *base* model (adapters off), so they stay comparable over time."""
        with self.base_model():
            return self.embedder.embed(texts)

    def embed_interactions(self, interactions: list[Interaction]) -> np.ndarray:
        """Selection embeddings of interactions, each as its embedder's text (`Embedder.text`)."""
        return self.embed([self.embedder.text(it) for it in interactions])

    def activate(self, rank: int, adaptation: AdaptationSettings) -> PeftModel:
        """Make the adapter slot for (rank, LoRA shape) active (adding it on first use) and return the model."""
        name = slot_name(rank, adaptation) + lane_suffix()  # a batched worker's threads each have their own slots
        if name not in self.model.peft_config:
            a = adaptation
            self.model.add_adapter(name, lora_config(rank, a.alpha_for(rank), a.lora_dropout, a.target_modules))
        self.model.set_adapter(name)
        return self.model

    def scoring_slots(self, rank: int, adaptation: AdaptationSettings, n: int) -> list[str]:
        """`n` extra adapter slots of this LoRA shape (added on first use, never trained, the active adapter
        unchanged), into which the gate loads the adapters it scores side by side."""
        names = [f"{slot_name(rank, adaptation)}{lane_suffix()}-score{k}" for k in range(n)]
        missing = [name for name in names if name not in self.model.peft_config]
        if missing:
            active = self.model.active_adapter
            a = adaptation
            for name in missing:
                self.model.add_adapter(name, lora_config(rank, a.alpha_for(rank), a.lora_dropout, a.target_modules))
            self.model.set_adapter(active)  # adding may mark the new slots trainable: only the active one is
        return names

    @contextlib.contextmanager
    def base_model(self) -> Iterator[PeftModel]:
        """The shared model with every adapter disabled (the base model's behaviour)."""
        with self.model.disable_adapter(), torch.no_grad():
            yield self.model
