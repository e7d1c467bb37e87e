"""Registry of SSL algorithms by name (timm-style factory). A new algorithm: its file, and its module name here."""

from __future__ import annotations

import importlib

from sslfw.errors import ConfigError

MODULES = ("supervised", "fixmatch", "adamatch", "freematch", "comatch", "simmatch", "crmatch")


def get_algorithm(name: str) -> type:
    from sslfw.algorithms.base import REGISTRY

    for module in MODULES:
        importlib.import_module(f"sslfw.algorithms.{module}")
    if name not in REGISTRY:
        raise ConfigError(f"algorithm.name: {name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[name]
