"""AdaMatch (Berthelot et al., ICLR 2022) on one domain: distribution alignment + relative confidence threshold.

    p~ = normalize(p_w * p_target / p_model)      p_model, p_target: EMAs of the GLOBAL mean of p_w and p_lb
    tau = p_cutoff * mean_global(max p_lb)        relative threshold from labelled confidence (global batch)
    L = CE(z_lb, y) + mu(t) * lambda_u * mean(m * CE(z_s, argmax p~)),   m = [max p~ >= tau]
    mu(t) = 1/2 - cos(min(pi, 2 pi t / T)) / 2    the paper's warm-up of the unlabelled weight

USB deviations (docs/ALGORITHMS.md): USB takes tau from the local labelled batch and has no mu(t) warm-up;
`usb_compat: true` drops the warm-up (tau stays global: a per-rank threshold is a bug, not a choice). Random logit
interpolation is omitted: it exists to fix BatchNorm statistics and is the identity for a LayerNorm ViT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sslfw.algorithms.base import Algorithm, DataInfo, StepBatch, StepContext, StepOutput, forward_views, register
from sslfw.algorithms.losses import masked_consistency, supervised_ce
from sslfw.algorithms.stats import ema_update, global_mean
from sslfw.config import AlgorithmConfig
from sslfw.data.labels import NUM_CLASSES


@register
class AdaMatch(Algorithm):
    name = "adamatch"

    @dataclass
    class Params:
        p_cutoff: float = 0.95
        ema_p: float = 0.999
        usb_compat: bool = False

    def __init__(self, cfg: AlgorithmConfig, data: DataInfo):
        super().__init__(cfg, data)
        self.register_buffer("p_model", torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES))
        self.register_buffer("p_target", torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES))
        self.register_buffer("initialised", torch.tensor(False))

    def unsup_weight(self, ctx: StepContext) -> float:
        if self.p.usb_compat:
            return 1.0
        return 0.5 - math.cos(min(math.pi, 2 * math.pi * ctx.step / ctx.total_steps)) / 2

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        lb, w, s = forward_views(model, [batch.x_lb, batch.x_ulb_w[0], batch.x_ulb_s[0]], self.no_grad_views(ctx))
        sup = supervised_ce(lb["logits"], batch)
        with torch.no_grad():
            p_lb = lb["logits"].detach().float().softmax(-1)
            p_w = w["logits"].detach().float().softmax(-1)
            mean_w, mean_lb = global_mean(p_w), global_mean(p_lb)
            # USB and the paper start p_model at the first batch's mean (chosen on the device: no host sync)
            moved = self.p_model.mul(self.p.ema_p).add_(mean_w, alpha=1 - self.p.ema_p)
            self.p_model.copy_(torch.where(self.initialised, moved, mean_w))
            self.initialised.fill_(True)
            ema_update(self.p_target, mean_lb, self.p.ema_p)
            aligned = p_w * (self.p_target + 1e-6) / (self.p_model + 1e-6)
            aligned = aligned / aligned.sum(-1, keepdim=True)
            tau = self.p.p_cutoff * global_mean(p_lb.max(-1).values[:, None])[0]
            conf, target = aligned.max(-1)
            mask = (conf >= tau).float()
        unsup = masked_consistency(s["logits"], target, mask, self.cfg.consistency)
        loss = sup + self.unsup_weight(ctx) * self.cfg.lambda_u * unsup
        return StepOutput(
            loss,
            {"sup_loss": sup.detach(), "unsup_loss": unsup.detach(), "mask_ratio": mask.mean(), "threshold": tau},
            pseudo=(target, mask),
        )
