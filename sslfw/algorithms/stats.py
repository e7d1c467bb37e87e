"""Statistics over the GLOBAL batch, so W ranks with batch B compute what 1 rank with batch W*B would.

USB takes several of these over the local batch (AdaMatch's labelled confidence, FreeMatch's fairness histogram:
docs/NOTES.md, USB); here every cross-sample statistic goes through these helpers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sslfw.dist import is_dist, timed_sync


@torch.no_grad()
def global_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if is_dist():
        with timed_sync():
            dist.all_reduce(t)
    return t


@torch.no_grad()
def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the concatenation of every rank's `x`."""
    total = global_sum(torch.cat([x.detach().float().sum(0).flatten(), x.new_tensor([len(x)], dtype=torch.float32)]))
    return (total[:-1] / total[-1].clamp_min(1)).view(x.shape[1:])


def ema_update(state: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    state.mul_(momentum).add_(value.to(state.dtype), alpha=1 - momentum)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """F.one_hot without its range check, which reads the labels' min and max back to the host (a device sync)."""
    return (labels[:, None] == torch.arange(num_classes, device=labels.device)).float()
