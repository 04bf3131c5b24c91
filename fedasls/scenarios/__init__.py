"""Scenario files: a path to a TOML file, or the name of one shipped with fedasls (fedasls/scenarios/)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fedasls.config import ConfigError


def scenario_path(name_or_path: str) -> Path:
    """A scenario TOML: an existing path, or the name of one shipped with fedasls (fedasls/scenarios/) (e.g. "quickstart")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("fedasls.scenarios") / f"{name_or_path.removesuffix('.toml')}.toml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".toml") for p in resources.files("fedasls.scenarios").iterdir() if p.name.endswith(".toml"))
    raise ConfigError(f"scenario '{name_or_path}' is neither a file nor a shipped scenario ({', '.join(names)}). "
                      "Fix: pass an existing .toml path or one of those names to --config.")
