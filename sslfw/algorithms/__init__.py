"""Registry of SSL algorithms by name (timm-style factory). A new algorithm: its file, and its module name here."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing

from sslfw.config import AlgorithmConfig, coerce
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


def resolve_params(alg: AlgorithmConfig) -> None:
    """Replace `alg.params` by every field of the algorithm's Params: given values type-checked, the rest defaults
    (so config.yaml, checkpoints and W&B record every value in force)."""
    params_cls = get_algorithm(alg.name).Params
    hints = typing.get_type_hints(params_cls)
    unknown = sorted(set(alg.params) - set(hints))
    if unknown:
        close = difflib.get_close_matches(unknown[0], hints, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"algorithm.params.{unknown[0]}: {alg.name} has no such setting; {hint}known: {sorted(hints)}"
        )
    defaults = dataclasses.asdict(params_cls())
    alg.params = {k: coerce(f"algorithm.params.{k}", alg.params.get(k, defaults[k]), hints[k]) for k in hints}
