"""Where a run's devices come from: the synthetic population, or a local data file."""

from __future__ import annotations

from pathlib import Path

from fedasls.config import PopulationSettings
from fedasls.data.loaders import JsonlPopulation
from fedasls.data.population import Population, SyntheticPopulation
from fedasls.data.stackexchange import StackExchangePopulation, attribution

ATTRIBUTION_FILE = "ATTRIBUTION.txt"  # written into a run's folder when its data asks for credit


def population_from_settings(settings: PopulationSettings) -> Population:
    """The population a run describes: synthetic, a local JSONL file, or a Stack Exchange dump."""
    if settings.source == "jsonl":
        return JsonlPopulation(settings.jsonl_path, partition=settings.partition, num_devices=settings.num_devices,
                               seed=settings.seed, heldout=settings.heldout, alpha=settings.dirichlet_alpha)
    if settings.source == "stackexchange":
        return StackExchangePopulation(settings.posts_path, num_devices=settings.num_devices,
                                       min_answers=settings.min_answers_per_user, seed=settings.seed,
                                       heldout=settings.heldout)
    return SyntheticPopulation(settings.num_devices, seed=settings.seed, stream_length=settings.stream_length,
                               heldout=settings.heldout, drift_fraction=settings.drift_fraction,
                               trend_share=settings.trend_share)


def dataset_path(settings: PopulationSettings) -> Path | None:
    """The data file a population reads (None for the synthetic population)."""
    path = {"jsonl": settings.jsonl_path, "stackexchange": settings.posts_path}.get(settings.source)
    return Path(path) if path else None


def dataset_setting(settings: PopulationSettings) -> str | None:
    """The setting that names that file, as a user writes it (e.g. population.jsonl_path)."""
    key = {"jsonl": "jsonl_path", "stackexchange": "posts_path"}.get(settings.source)
    return f"population.{key}" if key else None


def attribution_text(settings: PopulationSettings) -> str | None:
    """What a run on this data must say about where it came from and under which license (the text
    of the run's ATTRIBUTION.txt), or None when the data asks for no credit. Reads no data."""
    if settings.source == "stackexchange":
        return attribution(settings.posts_path, site=settings.site, license=settings.content_license)
    return None
