"""Where a run's devices come from: the synthetic population, or a local data file."""

from __future__ import annotations

from fedasls.config import PopulationSettings
from fedasls.data.loaders import JsonlPopulation
from fedasls.data.population import Population, SyntheticPopulation


def population_from_settings(settings: PopulationSettings) -> Population:
    """The population a run describes: synthetic, or loaded from a local JSONL file."""
    if settings.source == "jsonl":
        return JsonlPopulation(settings.jsonl_path, partition=settings.partition, num_devices=settings.num_devices,
                               seed=settings.seed, heldout=settings.heldout, alpha=settings.dirichlet_alpha)
    return SyntheticPopulation(settings.num_devices, seed=settings.seed, stream_length=settings.stream_length,
                               heldout=settings.heldout, drift_fraction=settings.drift_fraction,
                               trend_share=settings.trend_share)
