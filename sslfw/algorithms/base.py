"""The step contract every algorithm implements: one labelled batch and unlabelled views in, one loss and logs out.

The trainer owns data, augmentation, optimisation, EMA, checkpoints and logging; an algorithm owns only how the
loss is computed and its own state (thresholds, distribution estimates, memory banks), which it exposes through
state_dict/load_state_dict so checkpoints carry it. A new algorithm is one file with a subclass and @register.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from sslfw.config import AlgorithmConfig, ConfigError


@dataclass
class StepBatch:
    """Views on the training device: float images in [0, 1], NCHW, already augmented."""

    x_lb: torch.Tensor  # weak view of the labelled batch
    y_lb: torch.Tensor  # levels 0..4
    idx_lb: torch.Tensor  # dense indices into the labelled train set (memory banks key on them)
    x_ulb_w: torch.Tensor | None = None  # weak view of the unlabelled batch
    x_ulb_s: list[torch.Tensor] = field(default_factory=list)  # strong views, as many as the algorithm asked for
    idx_ulb: torch.Tensor | None = None


@dataclass
class StepContext:
    step: int
    total_steps: int
    teacher: nn.Module | None  # the EMA teacher (eval mode, fp32), when enabled
    num_labelled: int  # size of the labelled train set (memory banks are sized by it)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Algorithm(nn.Module):
    """Base class. Class attributes tell the trainer what to feed and which model heads to build."""

    name: ClassVar[str]
    uses_unlabelled: ClassVar[bool] = True
    num_strong: ClassVar[int] = 1
    projection: ClassVar[bool] = False  # needs model output "proj" (L2-normalised)
    extra_heads: ClassVar[dict[str, int]] = {}  # name -> output size (0: the feature width), e.g. {"rot": 4}

    @dataclass
    class Params:
        """The algorithm's own hyper-parameters (config: algorithm.params)."""

    def __init__(self, cfg: AlgorithmConfig, num_labelled: int, proj_dim: int):
        super().__init__()
        self.cfg = cfg
        names = {f.name for f in dataclasses.fields(self.Params)}
        unknown = set(cfg.params) - names
        if unknown:
            raise ConfigError(f"algorithm.params: unknown key(s) {sorted(unknown)} for {self.name}; "
                              f"known: {sorted(names)}")
        self.p = self.Params(**cfg.params)

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        raise NotImplementedError


def forward_views(model: nn.Module, views: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One forward over the concatenated views (one DDP sync, one pass through the backbone), split back."""
    out = model(torch.cat(views))
    sizes = [len(v) for v in views]
    return [{k: v for k, v in zip(out, parts)} for parts in zip(*(t.split(sizes) for t in out.values()))]
