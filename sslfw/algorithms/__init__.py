"""Registry of SSL algorithms by name (timm-style factory)."""

from __future__ import annotations

import importlib

from sslfw.config import ConfigError

ALGORITHMS: dict[str, type] = {}
_MODULES = ("supervised", "fixmatch", "adamatch", "freematch", "comatch", "simmatch", "crmatch")


def register(cls: type) -> type:
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str) -> type:
    for module in _MODULES:
        importlib.import_module(f"sslfw.algorithms.{module}")
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: {name!r} is not one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
