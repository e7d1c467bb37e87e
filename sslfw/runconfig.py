"""The config a run uses: parsed and checked by sslfw/config.py (which imports nothing heavy, so `--help` and
`sslfw config` stay fast), then resolved here against the layers above it: the algorithm's own params, the starting
weights' sha256 and normalisation, the timm model name."""

from __future__ import annotations

from pathlib import Path

from sslfw.algorithms import resolve_params
from sslfw.config import Config, parse_config
from sslfw.model import check_name
from sslfw.weights import resolve_model


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """A run's Config from a YAML file and `--section.key=value` overrides (or a nested dict), fully resolved."""
    cfg = parse_config(path, overrides)
    resolve_params(cfg.algorithm)
    check_name(cfg.model.name)
    resolve_model(cfg.model)
    return cfg
