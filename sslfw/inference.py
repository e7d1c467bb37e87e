"""Load a trained model from a checkpoint for evaluation, pseudo-labelling and prediction.

A checkpoint carries its resolved config, so the model is rebuilt exactly as trained (architecture, heads) with no
config file to keep in sync; `weights` picks the EMA teacher or the student weights.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sslfw import ckpt
from sslfw.algorithms import get_algorithm
from sslfw.config import IMAGENET_NORM, Config, load_config
from sslfw.errors import ConfigError, DataError
from sslfw.model import IQAModel


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({str(e).splitlines()[0]})") from None


def load_model(path: str | Path, weights: str = "ema") -> tuple[IQAModel, Config, Path]:
    """(model in eval mode on CPU, its training config, the checkpoint directory used)."""
    path = ckpt.resolve(path, "--checkpoint")
    state, info = ckpt.load(path)
    saved = info["config"] if "config" in info else _read_yaml(path.parent / "config.yaml")
    if "mean" not in saved.get("model", {}):  # trained before sslfw recorded it: ImageNet's, then hard-coded
        saved = {**saved, "model": {**saved.get("model", {}), "mean": IMAGENET_NORM[0], "std": IMAGENET_NORM[1]}}
    # The checkpoint holds every weight: the starting weights' file need not exist here (its sha256 stays recorded)
    cfg = load_config(None, {**saved, "model": {**saved.get("model", {}), "pretrained": ""}})
    algo = get_algorithm(cfg.algorithm.name)
    model = IQAModel(cfg.model, algo.extra_heads, algo.projection, algo.score_head)  # edges: in the weights
    if weights == "ema":
        if not state.get("ema"):
            raise DataError(f"{path} has no EMA teacher (trained with ema.enabled=false); use --weights student")
        weights = state["ema"]["module"]
    elif weights == "student":
        weights = state["model"]
    else:
        raise ValueError(f"weights must be 'ema' or 'student', got {weights!r}")
    model.load_state_dict(weights)
    return model.eval(), cfg, path
