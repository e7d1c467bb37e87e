"""CRMatch (Fan, Kukleva, Dai, Schiele, IJCV 2023): FixMatch plus feature-level consistency and rotation prediction.

With m = [max softmax(z_w) >= p_cutoff], y^ = argmax z_w, ds(.) the "ds" head on pooled features:
    L_u   = mean(m * CE(z_s, y^))
    L_ds  = mean(m * max(0, cos(ds_s, ds_w)))          (a cosine-embedding loss with target -1, margin 0)
    L_rot = CE(rot(x_r), r)                            x_r: the unlabelled weak views turned by r * 90 degrees
    L = CE(z_lb, y) + lambda_u L_u + ds_loss_ratio L_ds + rot_loss_ratio L_rot
Rotations are made from this step's unlabelled weak views (square crops), so no second loader is needed.

USB deviations (docs/ALGORITHMS.md): USB ignores lambda_u and uses rot_loss_ratio only as an on/off switch (all
weights 1); `usb_compat: true` does the same. USB feeds rotation from a separate loader over the same unlabelled
images with the weak transform, which is what the weak views here are. We could not check the paper's exact
weights or head placement; the formulas follow USB's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslfw.algorithms.base import Algorithm, StepBatch, StepContext, StepOutput, forward_views, register
from sslfw.algorithms.losses import masked_consistency, supervised_ce


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[x; x turned 90; 180; 270] and the turn labels 0..3."""
    turned = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    return turned, torch.arange(4, device=x.device).repeat_interleave(len(x))


@register
class CRMatch(Algorithm):
    name = "crmatch"
    extra_heads = {"ds": 0, "rot": 4}

    @dataclass
    class Params:
        p_cutoff: float = 0.95
        ds_loss_ratio: float = 1.0
        rot_loss_ratio: float = 1.0  # 0 turns rotation prediction off
        usb_compat: bool = False

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        views = [batch.x_lb, batch.x_ulb_w[0], batch.x_ulb_s[0]]
        if self.p.rot_loss_ratio > 0:
            x_rot, y_rot = rotations(batch.x_ulb_w[0])
            views.append(x_rot)
        outs = forward_views(model, views)
        lb, w, s = outs[:3]
        sup = supervised_ce(lb["logits"], batch)
        with torch.no_grad():
            conf, pseudo = w["logits"].detach().float().softmax(-1).max(-1)
            mask = (conf >= self.p.p_cutoff).float()
        unsup = masked_consistency(s["logits"], pseudo, mask, self.cfg.consistency)
        ds = (F.cosine_similarity(s["ds"].float(), w["ds"].float(), dim=1).clamp_min(0) * mask).mean()
        rot = F.cross_entropy(outs[3]["rot"].float(), y_rot) if self.p.rot_loss_ratio > 0 else sup * 0.0
        if self.p.usb_compat:
            loss = sup + unsup + ds + rot
        else:
            loss = sup + self.cfg.lambda_u * unsup + self.p.ds_loss_ratio * ds + self.p.rot_loss_ratio * rot
        return StepOutput(
            loss,
            {
                "sup_loss": sup.detach(),
                "unsup_loss": unsup.detach(),
                "ds_loss": ds.detach(),
                "rot_loss": rot.detach(),
                "mask_ratio": mask.mean(),
            },
            pseudo=(pseudo, mask),
        )
