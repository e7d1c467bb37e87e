"""Optimizer with optional layer-wise lr decay, and the warm-up + cosine schedule as a pure function of the step.

The schedule keeps no state: lr(step) is recomputed each step, so a resumed run cannot drift from the plan.
"""

from __future__ import annotations

import math

import torch
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

from sslfw.config import OptimConfig
from sslfw.model import IQAModel


def build_optimizer(model: IQAModel, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Backbone groups get lr_scale = decay^(depth - layer); heads (classifier, projection, extras) scale 1.
    1-D parameters and the backbone's no_weight_decay() set (cls token, position embedding) get no weight decay."""
    skip = set(getattr(model.backbone, "no_weight_decay", lambda: set())())
    if cfg.layer_decay < 1.0:
        groups = param_groups_layer_decay(
            model.backbone, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
        )
    else:
        groups = param_groups_weight_decay(model.backbone, cfg.weight_decay, no_weight_decay_list=skip)
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups += [
        {"params": [p for p in heads if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in heads if p.ndim <= 1], "weight_decay": 0.0},
    ]
    for g in groups:
        g["lr_scale"] = g.get("lr_scale", 1.0)
        g["lr"] = cfg.lr * g["lr_scale"]
    groups = [g for g in groups if g["params"]]
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg.name]
    extra = {"weight_decay": 0.0} if cfg.name == "adam" else {}
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=cfg.fused or None, **extra)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up to 1, then cosine down to min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, cfg: OptimConfig) -> float:
    f = lr_factor(step, total, cfg)
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * g["lr_scale"] * f
    return cfg.lr * f
