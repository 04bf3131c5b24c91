"""Test helper: a copy of Settings with some keys of some sections replaced."""

from __future__ import annotations

from typing import Any

from fedasls.config import Settings


def updated(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """`settings` with `section={key: value}` replaced, e.g. updated(s, adaptation={"min_items": 5})
    (pydantic's model_copy on each section; nothing else changes)."""
    return settings.model_copy(update={
        name: getattr(settings, name).model_copy(update=values) for name, values in sections.items()})
