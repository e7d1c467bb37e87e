"""Replicated memory: a ring-buffer queue (CoMatch), a labelled-sample bank (SimMatch) and a distribution-alignment
queue (CoMatch, SimMatch).

Every write takes all-gathered tensors in rank order, so each rank applies the same update and the copies stay
identical without any broadcast. Sizes are in samples, so they do not change with world size or batch size.
All three are nn.Modules with buffers: they travel in the algorithm's state_dict, hence in checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslfw.algorithms.stats import global_mean


class _FillsOnce(nn.Module):
    """Memory that fills once and stays full: `full` reads the device (a sync) only until it first holds."""

    def _is_full(self) -> bool:
        raise NotImplementedError

    @property
    def full(self) -> bool:
        if not getattr(self, "_full", False):
            self._full = self._is_full()
        return self._full

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._full = False  # a loaded state is read again
        super()._load_from_state_dict(*args, **kwargs)


class RingQueue(_FillsOnce):
    """The newest `size` (feature, probability) rows; writes wrap around, nothing is truncated or skipped."""

    def __init__(self, size: int, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("feats", torch.zeros(size, dim))
        self.register_buffer("probs", torch.zeros(size, num_classes))
        self.register_buffer("ptr", torch.tensor(0))
        self.register_buffer("count", torch.tensor(0))

    def _is_full(self) -> bool:
        return int(self.count) >= len(self.feats)

    @torch.no_grad()
    def push(self, feats: torch.Tensor, probs: torch.Tensor) -> None:
        size, n = len(self.feats), len(feats)
        feats, probs = feats[-size:], probs[-size:]  # more rows than the queue holds: the newest win...
        skip = n - len(feats)  # ...in the slots that writing all n rows one by one would leave them in
        pos = (self.ptr + skip + torch.arange(len(feats), device=feats.device)) % size
        self.feats[pos] = F.normalize(feats.float(), dim=1)
        self.probs[pos] = probs.float()
        self.ptr.copy_((self.ptr + n) % size)
        self.count.copy_(torch.clamp(self.count + n, max=size))


class LabelledBank(_FillsOnce):
    """One unit-norm feature and label per labelled training sample, indexed by the sample's dense index."""

    def __init__(self, num_labelled: int, dim: int):
        super().__init__()
        self.register_buffer(
            "feats", F.normalize(torch.randn(num_labelled, dim, generator=torch.Generator().manual_seed(0)), dim=1)
        )
        self.register_buffer("labels", torch.zeros(num_labelled, dtype=torch.long))
        self.register_buffer("written", torch.zeros(num_labelled, dtype=torch.bool))

    def _is_full(self) -> bool:
        return bool(self.written.all())

    @torch.no_grad()
    def update(self, idx: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, usb_compat: bool = False) -> None:
        """Write gathered rows; an index seen twice keeps its last row (deterministic, unlike index_put on GPU)."""
        keep = _last_occurrence(idx, len(self.feats))
        idx, feats, labels = idx[keep], feats[keep].float(), labels[keep]
        if usb_compat:  # USB: EMA 0.7/0.3, then normalise across the updated samples (dim bug, docs/NOTES.md, USB)
            self.feats[idx] = F.normalize(0.7 * self.feats[idx] + 0.3 * feats, dim=0)
        else:
            self.feats[idx] = F.normalize(feats, dim=1)
        self.labels[idx] = labels
        self.written[idx] = True


def _last_occurrence(idx: torch.Tensor, size: int) -> torch.Tensor:
    """True where an index in 0..size-1 is seen for the last time in `idx`."""
    pos = torch.arange(len(idx), device=idx.device)
    last = torch.full((size,), -1, dtype=torch.long, device=idx.device)
    last.scatter_reduce_(0, idx, pos, reduce="amax")
    return last[idx] == pos


class DistAlignQueue(nn.Module):
    """Distribution alignment towards uniform with the mean of the last `length` global batch means (CoMatch):
    p~ = normalize(p * (1/C) / mean(queue)). The mean runs over the rows written so far; USB's queue starts as
    zeros and averages all `length` rows from the first step (`usb_compat`), which shrinks the early estimate."""

    def __init__(self, length: int, num_classes: int, usb_compat: bool = False):
        super().__init__()
        self.usb_compat = usb_compat
        self.register_buffer("queue", torch.zeros(length, num_classes))
        self.register_buffer("ptr", torch.tensor(0))
        self.register_buffer("count", torch.tensor(0))

    @torch.no_grad()
    def align(self, probs: torch.Tensor) -> torch.Tensor:
        self.queue.index_copy_(0, self.ptr[None], global_mean(probs)[None])  # tensor-indexed: no host sync
        self.ptr.copy_((self.ptr + 1) % len(self.queue))
        self.count.copy_(torch.clamp(self.count + 1, max=len(self.queue)))
        if self.usb_compat:
            p_model = self.queue.mean(0)
        else:  # the mean of the rows written so far, without reading the count back to the host
            written = torch.arange(len(self.queue), device=probs.device) < self.count
            p_model = (self.queue * written[:, None]).sum(0) / self.count
        aligned = probs * (1.0 / probs.shape[1] + 1e-6) / (p_model + 1e-6)
        return aligned / aligned.sum(-1, keepdim=True)
