"""Load a trained model from a checkpoint for evaluation, pseudo-labelling and prediction.

A checkpoint carries its resolved config, so the model is rebuilt exactly as trained (architecture, heads) with no
config file to keep in sync; `weights` picks the EMA teacher or the student weights.
"""

from __future__ import annotations

from pathlib import Path

from sslfw import ckpt
from sslfw.algorithms import get_algorithm
from sslfw.config import IMAGENET_NORM, Config
from sslfw.model import IQAModel
from sslfw.runconfig import load_config


def load_model(path: str | Path, weights: str = "ema") -> tuple[IQAModel, Config, Path]:
    """(model in eval mode on CPU, its training config, the checkpoint directory used)."""
    saved = ckpt.read(Path(path), "--checkpoint")
    trained = saved.config
    if "mean" not in trained.get("model", {}):  # trained before sslfw recorded it: ImageNet's, then hard-coded
        trained = {**trained, "model": {**trained.get("model", {}), "mean": IMAGENET_NORM[0], "std": IMAGENET_NORM[1]}}
    # The checkpoint holds every weight: the starting weights' file need not exist here (its sha256 stays recorded)
    cfg = load_config(None, {**trained, "model": {**trained.get("model", {}), "pretrained": ""}})
    algo = get_algorithm(cfg.algorithm.name)
    model = IQAModel(cfg.model, algo.extra_heads, algo.projection, algo.score_head)  # edges: in the weights
    model.load_state_dict(saved.weights(weights))
    return model.eval(), cfg, saved.path
