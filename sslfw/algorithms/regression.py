"""Supervised regression on MOS: the baseline of the score-based algorithms (Mean Teacher, RankUp).

    L = mean_i (s(x_i) - MOS_i)^2        over the labelled images that have a MOS

s is the model's score head (predicted MOS); the 5-level metrics read it through the label scheme's edges, so its
MAE and recall are comparable with the classifiers', and its SRCC/PLCC use the MOS itself.
"""

from __future__ import annotations

from torch import nn

from sslfw.algorithms.base import Algorithm, StepBatch, StepContext, StepOutput, register
from sslfw.algorithms.losses import score_mse


@register
class Regression(Algorithm):
    name = "regression"
    uses_unlabelled = False
    score_head = True

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        loss = score_mse(model(batch.x_lb)["mos"], batch.mos_lb)
        return StepOutput(loss, {"sup_loss": loss.detach()})
