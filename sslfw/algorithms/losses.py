"""Losses shared by several algorithms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_consistency(logits_s: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_i(mask_i * CE(logits_s,i, target_i)) over the whole batch; hard (long) or soft (prob) targets.
    The mean runs over all samples, masked or not (as FixMatch defines it), so equal per-rank batches make DDP's
    gradient average the global-batch loss."""
    if target.dtype == torch.long:
        ce = F.cross_entropy(logits_s.float(), target, reduction="none")
    else:
        ce = -(target * F.log_softmax(logits_s.float(), dim=-1)).sum(-1)
    return (ce * mask).mean()
