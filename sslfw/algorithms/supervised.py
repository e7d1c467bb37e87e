"""Supervised baseline (the paper's): cross-entropy on the labelled weak view; unlabelled data is not read."""

from __future__ import annotations

from torch import nn

from sslfw.algorithms.base import Algorithm, StepBatch, StepContext, StepOutput, register
from sslfw.algorithms.losses import supervised_ce


@register
class Supervised(Algorithm):
    name = "supervised"
    uses_unlabelled = False

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        logits = model(batch.x_lb)["logits"]
        loss = supervised_ce(logits, batch)
        return StepOutput(loss, {"sup_loss": loss.detach()})
