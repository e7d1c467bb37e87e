"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) on the MOS score, under quality-preserving views.

    L = mean_lb (s(x_lb) - MOS)^2 + lambda_u * w(t) * mean_i (s(x_s,i) - s~(x_w,i))^2
    w(t) = exp(-5 (1 - min(1, t / (rampup * T)))^2)      the paper's sigmoid ramp-up

s~ is the EMA teacher's score of the weak view (the teacher in eval mode, no gradient); with ema.enabled: false it
is the student's own weak-view score, detached: the Pi-model. The strong view should keep quality (aug.strong:
iqa_safe): a view that blurs or re-compresses the image changes the very score the teacher is asked to agree on.
Every image's target is used (no threshold), so `mask_ratio` is 1 and the trace marks all of them used.
`meanteacher_levels` works on the 5-level classifier instead: s = sum_k k p_k (the expected level) and
cross-entropy on the labels in place of the MOS error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sslfw.algorithms.base import Algorithm, StepBatch, StepContext, StepOutput, forward_views, register
from sslfw.algorithms.losses import levels_of, scores, supervised_score_loss


def sigmoid_rampup(step: int, total: int, fraction: float) -> float:
    if fraction <= 0:
        return 1.0
    t = min(1.0, step / (fraction * total))
    return math.exp(-5.0 * (1.0 - t) ** 2)


@register
class MeanTeacher(Algorithm):
    name = "meanteacher"
    score_head = True

    @dataclass
    class Params:
        rampup: float = 0.4  # share of the steps over which the consistency weight ramps up (USB's unsup_warm_up)

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        on_levels = not self.score_head
        if ctx.teacher is not None:
            lb, s = forward_views(model, [batch.x_lb, batch.x_ulb_s[0]])
            with torch.no_grad():
                target = scores(ctx.teacher(batch.x_ulb_w[0]), on_levels)
        else:  # Pi-model: the student's weak view is the target (forwarded without autograd where allowed)
            lb, w, s = forward_views(model, [batch.x_lb, batch.x_ulb_w[0], batch.x_ulb_s[0]], self.no_grad_views(ctx))
            target = scores(w, on_levels).detach()
        sup = supervised_score_loss(lb, batch, on_levels)
        unsup = ((scores(s, on_levels) - target) ** 2).mean()  # equal per-rank batches: DDP averages to the global
        weight = self.cfg.lambda_u * sigmoid_rampup(ctx.step, ctx.total_steps, self.p.rampup)
        level = levels_of(target, on_levels, self.data.edges)
        logs = {"sup_loss": sup.detach(), "unsup_loss": unsup.detach(), "mask_ratio": 1.0, "unsup_weight": weight}
        return StepOutput(sup + weight * unsup, logs, pseudo=(level, torch.ones_like(target)))


@register
class MeanTeacherLevels(MeanTeacher):
    """The same consistency on the 5-level classifier's expected level, with cross-entropy on the labels: no score
    head, so the score-based idea is tried on the head that fine-tunes best (docs/RESULTS.md)."""

    name = "meanteacher_levels"
    score_head = False
