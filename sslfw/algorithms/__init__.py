"""Registry of SSL algorithms by name (timm-style factory). A new algorithm: its file, and its module name here."""

from __future__ import annotations

import difflib
import importlib

from sslfw.errors import ConfigError

MODULES = (
    "supervised", "fixmatch", "adamatch", "freematch", "comatch", "simmatch", "crmatch",  # the paper's (classifiers)
    "regression", "meanteacher", "rankup",  # made for scores and ranks (rankup.py also registers rankup_rda)
)  # fmt: skip


def names() -> list[str]:
    """Every registered algorithm name (a module may register several: rankup and rankup_rda)."""
    from sslfw.algorithms.base import REGISTRY

    for module in MODULES:
        importlib.import_module(f"sslfw.algorithms.{module}")
    return sorted(REGISTRY)


def get_algorithm(name: str) -> type:
    from sslfw.algorithms.base import REGISTRY

    if name not in names():
        close = difflib.get_close_matches(name, names(), n=1)
        raise ConfigError(
            f"algorithm.name: {name!r} is not one of {names()}{f'; did you mean {close[0]!r}?' if close else ''}"
        )
    return REGISTRY[name]
