"""A timm backbone by name plus the heads sslfw needs: 5-level classifier, optional projection and extra heads.

The continuous quality prediction is the expected level sum_k k * p_k, which keeps the class view (for the SSL
algorithms) and a score view (for SRCC/PLCC against MOS) in one head. Pretrained weights come from a local file
or an installed package named in the config (sslfw/weights.py): nothing downloads.
"""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from sslfw.config import IMAGENET_NORM, ModelConfig
from sslfw.data.labels import DEFAULT_EDGES, NUM_CLASSES
from sslfw.errors import ConfigError
from sslfw.weights import load_into


def mlp(dim_in: int, dim_out: int, hidden: int | None = None) -> nn.Sequential:
    hidden = hidden or dim_in
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))


MOS_CENTRE = 3.0  # the score head predicts MOS - 3 on KonIQ's 1..5 scale: a fresh head starts mid-scale


class IQAModel(nn.Module):
    """backbone -> pooled feature -> {"logits", "feat", "proj"?, "mos"?, extra heads...}.

    With `score` (algorithms that regress MOS) a linear score head adds "mos", the predicted MOS, and "level", that
    MOS read through the label scheme's edges: a buffer saved with the weights, so a checkpoint grades images into
    the levels it was trained with wherever it is loaded."""

    def __init__(
        self,
        cfg: ModelConfig,
        extra_heads: dict[str, int] | None = None,
        projection: bool = False,
        score: bool = False,
        edges: tuple[float, ...] = DEFAULT_EDGES,
    ):
        super().__init__()
        kwargs = {"img_size": cfg.img_size, **cfg.kwargs} if "vit" in cfg.name or "deit" in cfg.name else cfg.kwargs
        try:
            self.backbone = timm.create_model(
                cfg.name, pretrained=False, num_classes=0, drop_path_rate=cfg.drop_path, **kwargs
            )
        except (TypeError, ValueError, AssertionError) as e:  # timm's answer to arguments a model does not take
            raise ConfigError(
                f"model.kwargs {cfg.kwargs}: timm's {cfg.name} refuses them ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160]}); check model.kwargs against that model"
            ) from None
        dim = self.backbone.num_features
        self.head = nn.Linear(dim, NUM_CLASSES)
        self.proj = mlp(dim, cfg.proj_dim) if projection else None
        self.extra = nn.ModuleDict({name: mlp(dim, out or dim) for name, out in (extra_heads or {}).items()})
        self.score = nn.Linear(dim, 1) if score else None
        if score:
            self.register_buffer("edges", torch.tensor(edges, dtype=torch.float32))
        # config.py resolved them from the weights' timm config (or the config file, which wins)
        self.register_buffer("mean", torch.tensor(cfg.mean or IMAGENET_NORM[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std or IMAGENET_NORM[1]).view(1, 3, 1, 1), persistent=False)
        if cfg.pretrained:
            load_into(self.backbone, cfg.pretrained, cfg.name)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`x`: float images in [0, 1], NCHW; normalisation happens here so callers never forget it."""
        feat = self.backbone((x - self.mean) / self.std)
        out = {"feat": feat, "logits": self.head(feat)}
        if self.proj is not None:
            out["proj"] = nn.functional.normalize(self.proj(feat), dim=1)
        for name, head in self.extra.items():
            out[name] = head(feat)
        if self.score is not None:
            out["mos"] = MOS_CENTRE + self.score(feat).float().squeeze(-1)
            out["level"] = self.levels(out["mos"])
        return out

    def levels(self, mos: torch.Tensor) -> torch.Tensor:
        """Levels of predicted MOS values: the number of edges each reaches (as LabelScheme.label)."""
        return torch.bucketize(mos.float().contiguous(), self.edges, right=True)


def expected_score(probs: torch.Tensor) -> torch.Tensor:
    """sum_k k * p_k: a continuous quality level in [0, 4], from class probabilities."""
    return probs.float() @ torch.arange(probs.shape[-1], device=probs.device, dtype=torch.float32)


def check_name(name: str) -> None:
    """A timm model name, or one ConfigError with the closest names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"model.name: {name!r} is not a timm model{f'; close: {close}' if close else ''}")
