"""EMA teacher: an fp32 copy of the student, outside DDP, updated after every optimizer step.

Kept out of DDP on purpose: DDP would broadcast its buffers and all-reduce nothing useful (USB wraps it, issue #13).
Every rank updates its own copy from identical DDP parameters, so the copies stay identical without communication.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    def current_decay(self) -> float:
        # Warm-up: (1+t)/(10+t) starts near 0.1, so the teacher follows the fast-moving early student.
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        # One fused kernel per group of tensors, not one launch per tensor (~150 on ViT-S): the same lerp
        torch._foreach_lerp_(list(self.module.parameters()), [s.detach().float() for s in model.parameters()], 1 - d)
        # Buffers (BatchNorm's running statistics) are the student's, as in USB: the teacher normalises with them
        torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
