"""FreeMatch (Wang et al., ICLR 2023): self-adaptive thresholds and a self-adaptive fairness term.

State (EMAs with momentum lambda, tau_g's min(lambda, t/(t+1)) at step t with warm_start; from the GLOBAL batch
before masking):
    tau_g <- lambda tau_g + (1-lambda) mean(max p_w)      p_bar <- lambda p_bar + (1-lambda) mean(p_w)
    h_bar <- lambda h_bar + (1-lambda) hist(argmax p_w) / B_u
Mask: m = [max p_w >= tau_g * p_bar[argmax p_w] / max(p_bar)];  L_u = mean(m * CE(z_s, argmax p_w))
Fairness (if any sample is masked in the global batch), with inv0(x) = 1/x and 1/0 -> 0:
    L_f = sum_c SumNorm(p_bar * inv0(h_bar))_c * log(SumNorm(mean_m p_s * inv0(hist_m(argmax p_s)))_c + 1e-12)
L = L_s + lambda_u L_u + ent_loss_ratio L_f   (L_f <= 0: it rewards diverse strong-view predictions).
USB computes L_f's mean and histogram on each rank's local masked samples (docs/NOTES.md, USB); here both span
the global batch, and the gradient is scaled so DDP's average equals the one-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslfw.algorithms.base import Algorithm, DataInfo, StepBatch, StepContext, StepOutput, forward_views, register
from sslfw.algorithms.losses import masked_consistency, supervised_ce
from sslfw.algorithms.stats import ema_update, global_mean, global_sum, one_hot
from sslfw.config import AlgorithmConfig
from sslfw.data.labels import NUM_CLASSES
from sslfw.dist import all_gather_cat, is_dist


def _inv0(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-12), torch.zeros_like(x))


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum().clamp_min(1e-12)


@register
class FreeMatch(Algorithm):
    name = "freematch"

    @dataclass
    class Params:
        ema_p: float = 0.999
        ent_loss_ratio: float = 0.001  # USB's ViT configs (the argparse default is 0.01)
        use_quantile: bool = False
        clip_thresh: bool = False
        # USB starts tau_g at 1/C and moves it by (1 - ema_p) per step: with ema_p 0.999 it is still near 1/C after
        # hundreds of steps, so every pseudo-label passes. warm_start updates tau_g with momentum min(ema_p, t/(t+1))
        # at step t (a plain running mean until the EMA's horizon), so it starts at the model's own confidence. The
        # class statistics keep USB's uniform start: warm-started, a first batch that predicts one class would zero
        # the others' histogram and silence the fairness term exactly when predictions collapse.
        warm_start: bool = True

    def __init__(self, cfg: AlgorithmConfig, data: DataInfo):
        super().__init__(cfg, data)
        c = NUM_CLASSES
        self.register_buffer("time_p", torch.tensor(1.0 / c))
        self.register_buffer("p_model", torch.full((c,), 1.0 / c))
        self.register_buffer("label_hist", torch.full((c,), 1.0 / c))

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        lb, w, s = forward_views(model, [batch.x_lb, batch.x_ulb_w[0], batch.x_ulb_s[0]], self.no_grad_views(ctx))
        sup = supervised_ce(lb["logits"], batch)
        with torch.no_grad():
            p_w = w["logits"].detach().float().softmax(-1)
            conf, pseudo = p_w.max(-1)
            if self.p.use_quantile:
                level = torch.quantile(all_gather_cat(conf), 0.8)
            else:
                level = global_mean(conf[:, None])[0]
            m = min(self.p.ema_p, ctx.step / (ctx.step + 1)) if self.p.warm_start else self.p.ema_p
            ema_update(self.time_p, level, m)
            if self.p.clip_thresh:
                self.time_p.clamp_(0.0, 0.95)
            ema_update(self.p_model, global_mean(p_w), self.p.ema_p)
            ema_update(self.label_hist, global_mean(one_hot(pseudo, NUM_CLASSES)), self.p.ema_p)
            mask = (conf >= self.time_p * self.p_model[pseudo] / self.p_model.max()).float()
        unsup = masked_consistency(s["logits"], pseudo, mask, self.cfg.consistency)
        fair = self.fairness(s["logits"], mask)
        loss = sup + self.cfg.lambda_u * unsup + self.p.ent_loss_ratio * fair
        return StepOutput(
            loss,
            {
                "sup_loss": sup.detach(),
                "unsup_loss": unsup.detach(),
                "fair_loss": fair.detach(),
                "mask_ratio": mask.mean(),
                "threshold": self.time_p.clone(),
            },
            pseudo=(pseudo, mask),
        )

    def fairness(self, logits_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_f over the masked strong views of the global batch (0 if none is masked anywhere)."""
        p_s = logits_s.float().softmax(-1) * mask[:, None]
        hist_s = one_hot(p_s.argmax(-1), NUM_CLASSES) * mask[:, None]
        local_sum = p_s.sum(0)
        totals = global_sum(torch.cat([local_sum.detach(), hist_s.sum(0), mask.sum()[None]]))
        n = totals[-1].clamp_min(1)  # 0 masked anywhere: the value below is finite and then replaced by 0
        # Global mean with this rank's part differentiable: other ranks' sums enter as constants.
        mean_s = (local_sum + totals[:NUM_CLASSES] - local_sum.detach()) / n
        hist = totals[NUM_CLASSES:-1] / n
        target = _sum_norm(self.p_model * _inv0(self.label_hist))
        value = (target * torch.log(_sum_norm(mean_s * _inv0(hist)) + 1e-12)).sum()
        # Chosen on the device (no host sync); the graph stays whole for DDP's gradient hooks either way.
        value = torch.where(totals[-1] > 0, value, torch.zeros_like(value))
        world = torch.distributed.get_world_size() if is_dist() else 1
        # DDP averages gradients over ranks; scale this rank's share so the average is the one-process gradient.
        return world * value - (world - 1) * value.detach()
