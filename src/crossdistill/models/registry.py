"""One registry of model families by name: used by the CLI's choices, presets and the contract tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from crossdistill.errors import ModelLoadError
from crossdistill.models.base import Space

FAMILIES: dict[str, type[Space]] = {}


def register_family(name: str) -> Callable[[type[Space]], type[Space]]:
    """Class decorator: ``@register_family("sd15")`` makes the family loadable by name."""

    def wrap(cls: type[Space]) -> type[Space]:
        cls.family = name
        FAMILIES[name] = cls
        return cls

    return wrap


def _ensure_loaded() -> None:
    # Importing the family modules runs their @register_family decorators.
    from crossdistill.models import flux, sd3, sd15, sdxl  # noqa: F401


def family_names() -> list[str]:
    _ensure_loaded()
    return sorted(FAMILIES)


def get_family(name: str) -> type[Space]:
    _ensure_loaded()
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown model family {name!r}; choose one of: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def load_space(family: str, path: str | Path, **kwargs) -> Space:
    """Load a space of ``family`` from a local diffusers folder or a hub id (clear errors on failure)."""
    return get_family(family).from_pretrained(path, **kwargs)
