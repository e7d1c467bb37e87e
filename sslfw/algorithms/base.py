"""The step contract every algorithm implements: one labelled batch and unlabelled views in, one loss and logs out.

The trainer owns data, augmentation, optimisation, EMA, checkpoints and logging; an algorithm owns only how the
loss is computed and its own state (thresholds, distribution estimates, memory banks), which it exposes through
state_dict/load_state_dict so checkpoints carry it. It tells the trainer what to feed through class attributes
(`views`, `projection`, `extra_heads`) and gets what it needs to size its state from one `DataInfo`. A new
algorithm is one file with a subclass decorated with `@register`, plus its module name in `algorithms/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from sslfw.config import AlgorithmConfig, AugConfig
from sslfw.data.labels import DEFAULT_EDGES

REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: makes `cls` available as `algorithm.name: <cls.name>`."""
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class DataInfo:
    """What an algorithm may size its state by (banks, queues, per-sample thresholds)."""

    num_labelled: int  # labelled training samples (dense idx 0..n-1)
    num_unlabelled: int  # unlabelled pool samples (dense idx 0..n-1)
    proj_dim: int  # width of the model's projection head, when the algorithm asks for one
    edges: tuple[float, ...] = DEFAULT_EDGES  # the label scheme's MOS edges (a score head grades through them)


@dataclass(frozen=True)
class Views:
    """How many augmented views of each unlabelled image the trainer builds per step."""

    weak: int = 1
    strong: int = 1


@dataclass
class StepBatch:
    """Views on the training device: float images in [0, 1], NCHW, already augmented."""

    x_lb: torch.Tensor  # weak view of the labelled batch
    y_lb: torch.Tensor  # levels 0..4
    idx_lb: torch.Tensor  # dense indices into the labelled train set (memory banks key on them)
    x_ulb_w: list[torch.Tensor] = field(default_factory=list)  # weak views of the unlabelled batch
    x_ulb_s: list[torch.Tensor] = field(default_factory=list)  # strong views, as many as the algorithm asked for
    idx_ulb: torch.Tensor | None = None
    keys_ulb: list[str] = field(default_factory=list)  # sample keys of the unlabelled batch (the pseudo-label trace)
    y_lb_soft: torch.Tensor | None = None  # level probabilities from the votes (algorithm.sup_targets: votes)
    mos_lb: torch.Tensor | None = None  # MOS of the labelled batch (NaN where a hand label has none)


@dataclass
class StepContext:
    step: int
    total_steps: int
    teacher: nn.Module | None  # the EMA teacher (eval mode, fp32), when enabled
    split_weak: bool = False  # the model may forward the weak view apart, without autograd (no batch statistics)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    # (level, 1.0 where it passed the threshold) per weak unlabelled image: the trainer traces pseudo-label quality
    pseudo: tuple[torch.Tensor, torch.Tensor] | None = None


class Algorithm(nn.Module):
    """Base class. Class attributes tell the trainer what to feed and which model heads to build."""

    name: ClassVar[str]
    uses_unlabelled: ClassVar[bool] = True
    min_views: ClassVar[Views] = Views(weak=1, strong=1)  # aug.num_strong may raise the strong count
    projection: ClassVar[bool] = False  # needs model output "proj" (L2-normalised)
    extra_heads: ClassVar[dict[str, int]] = {}  # name -> output size (0: the feature width), e.g. {"rot": 4}
    score_head: ClassVar[bool] = False  # regresses MOS: the model gets a score head and predicts with it

    @dataclass
    class Params:
        """The algorithm's own hyper-parameters (config: algorithm.params), resolved when the config loads."""

    @classmethod
    def views(cls, aug: AugConfig) -> Views:
        if not cls.uses_unlabelled:
            return Views(weak=0, strong=0)
        return Views(weak=cls.min_views.weak, strong=max(cls.min_views.strong, aug.num_strong))

    def __init__(self, cfg: AlgorithmConfig, data: DataInfo):
        super().__init__()
        self.cfg, self.data = cfg, data
        self.p = self.Params(**cfg.params)  # config.py has checked names and types against Params

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def no_grad_views(self, ctx: StepContext) -> tuple[int, ...]:
        """Positions in the [labelled, weak, strong...] view list that may skip autograd: the weak view, for an
        algorithm whose weak outputs are only targets, unless `usb_compat` asks for USB's single forward."""
        return (1,) if ctx.split_weak and not getattr(self.p, "usb_compat", False) else ()


def forward_views(
    model: nn.Module, views: list[torch.Tensor], no_grad: tuple[int, ...] = ()
) -> list[dict[str, torch.Tensor]]:
    """One forward over the concatenated views (one DDP sync, one pass through the backbone), split back. Views
    in `no_grad` go through a second forward without autograd: the same outputs for a model without batch
    statistics, and no activations kept for a backward that would never reach them."""
    outs: dict[int, dict[str, torch.Tensor]] = {}
    for chosen, grad in (([i for i in range(len(views)) if i not in no_grad], True), (list(no_grad), False)):
        if not chosen:
            continue
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = model(torch.cat([views[i] for i in chosen]))
        sizes = [len(views[i]) for i in chosen]
        parts = zip(*(t.split(sizes) for t in out.values()))
        outs |= {i: dict(zip(out, p)) for i, p in zip(chosen, parts)}
    return [outs[i] for i in range(len(views))]
