"""Supervised baseline (the paper's): cross-entropy on the labelled weak view; unlabelled data is not read."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sslfw.algorithms.base import Algorithm, StepBatch, StepContext, StepOutput, register


@register
class Supervised(Algorithm):
    name = "supervised"
    uses_unlabelled = False

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        logits = model(batch.x_lb)["logits"]
        loss = F.cross_entropy(logits.float(), batch.y_lb)
        return StepOutput(loss, {"sup_loss": loss.detach()})
