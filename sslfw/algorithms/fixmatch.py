"""FixMatch (Sohn et al., NeurIPS 2020): confident weak-view predictions become targets for the strong view.

    L = CE(z_lb, y) + lambda_u * mean_i( m_i * CE(z_s,i, t_i) ),   m_i = [max softmax(z_w,i) >= p_cutoff]

t_i is argmax z_w,i (hard) or softmax(z_w,i / T) (soft). The mean runs over the whole unlabelled batch, and
ranks hold equal batches, so DDP's gradient average is the global-batch loss: nothing spans ranks here.
USB deviation: USB never applies T to soft targets; `usb_compat: true` reproduces that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslfw.algorithms.base import Algorithm, StepBatch, StepContext, StepOutput, forward_views, register
from sslfw.algorithms.losses import masked_consistency, supervised_ce


@register
class FixMatch(Algorithm):
    name = "fixmatch"

    @dataclass
    class Params:
        p_cutoff: float = 0.95
        hard_label: bool = True
        T: float = 0.5  # soft-target temperature (only with hard_label: false)
        usb_compat: bool = False

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        lb, w, s = forward_views(model, [batch.x_lb, batch.x_ulb_w[0], batch.x_ulb_s[0]], self.no_grad_views(ctx))
        sup = supervised_ce(lb["logits"], batch)
        with torch.no_grad():
            z_w = w["logits"].detach().float()
            probs = z_w.softmax(-1)
            conf, hard = probs.max(-1)
            mask = (conf >= self.p.p_cutoff).float()
            if self.p.hard_label:
                target = hard
            else:
                target = probs if self.p.usb_compat else (z_w / self.p.T).softmax(-1)
        unsup = masked_consistency(s["logits"], target, mask, self.cfg.consistency)
        loss = sup + self.cfg.lambda_u * unsup
        logs = {"sup_loss": sup.detach(), "unsup_loss": unsup.detach(), "mask_ratio": mask.mean()}
        return StepOutput(loss, logs, pseudo=(hard, mask))
