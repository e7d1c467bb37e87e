"""CoMatch (Li, Xiong, Hoi, ICCV 2021): memory-smoothed pseudo-labels plus a graph-contrastive loss.

With f = L2-normalised projections, p_w = softmax(z_w), all targets without gradient:
    p~ = DA(p_w)                                       alignment to uniform over the last da_len global batch means
    p^ = alpha p~ + (1-alpha) softmax_q(f_w F_q^T / T) P_q    once the queue is full (before: p^ = p~)
    m = [max p^ >= p_cutoff];   L_u = mean(m * CE(z_s0, p^))        (soft targets)
    W = p^ p^T over the GLOBAL unlabelled batch, diagonal 1, entries < contrast_p_cutoff zeroed, rows normalised
    S = softmax_rows(f_s0 f_s1^T / T) against the GLOBAL batch;  L_c = mean_i sum_j -W_ij log(S_ij + 1e-7)
    L = CE(z_lb, y) + lambda_u L_u + contrast_loss_ratio L_c
The queue (size in samples) then takes the gathered [f_w of every rank; f_lb of every rank] with [p~; onehot(y)].

USB deviations (docs/ALGORITHMS.md): USB's graph and contrast are per rank (no cross-rank pairs), its queue is
sized in steps and truncates writes that cross its end, and smoothing starts only after its first "epoch".
`usb_compat: true` restores the late start (smoothing from step `usb_epoch_steps`); the rest stays global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslfw.algorithms.bank import DistAlignQueue, RingQueue
from sslfw.algorithms.base import (
    Algorithm,
    DataInfo,
    StepBatch,
    StepContext,
    StepOutput,
    Views,
    forward_views,
    register,
)
from sslfw.algorithms.losses import masked_consistency, supervised_ce
from sslfw.algorithms.stats import one_hot
from sslfw.config import AlgorithmConfig
from sslfw.data.labels import NUM_CLASSES
from sslfw.dist import all_gather_cat, all_gather_with_grad, rank_offset


@register
class CoMatch(Algorithm):
    name = "comatch"
    min_views = Views(weak=1, strong=2)
    projection = True

    @dataclass
    class Params:
        p_cutoff: float = 0.95
        T: float = 0.2  # USB's ViT configs; smoothing and contrast share it
        contrast_p_cutoff: float = 0.8
        contrast_loss_ratio: float = 1.0
        smoothing_alpha: float = 0.9
        queue_size: int = 512  # samples (USB ViT: 32 steps x 2 x 8)
        da_len: int = 32
        usb_compat: bool = False
        usb_epoch_steps: int = 1024  # USB's "epoch" length, used only with usb_compat

    def __init__(self, cfg: AlgorithmConfig, data: DataInfo):
        super().__init__(cfg, data)
        self.queue = RingQueue(self.p.queue_size, data.proj_dim, NUM_CLASSES)
        self.da = DistAlignQueue(self.p.da_len, NUM_CLASSES, usb_compat=self.p.usb_compat)

    def smoothing_active(self, ctx: StepContext) -> bool:
        return self.queue.full and (not self.p.usb_compat or ctx.step >= self.p.usb_epoch_steps)

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        views = [batch.x_lb, batch.x_ulb_w[0], *batch.x_ulb_s[:2]]
        lb, w, s0, s1 = forward_views(model, views, self.no_grad_views(ctx))
        sup = supervised_ce(lb["logits"], batch)
        T = self.p.T
        with torch.no_grad():
            f_w, f_lb = w["proj"].detach().float(), lb["proj"].detach().float()
            p_orig = self.da.align(w["logits"].detach().float().softmax(-1))
            target = p_orig
            if self.smoothing_active(ctx):
                affinity = (f_w @ self.queue.feats.T / T).softmax(-1)
                target = self.p.smoothing_alpha * p_orig + (1 - self.p.smoothing_alpha) * affinity @ self.queue.probs
            mask = (target.max(-1).values >= self.p.p_cutoff).float()
            # Pseudo-label graph over the global batch; this rank's rows against every rank's columns.
            all_target = all_gather_cat(target)
            graph = target @ all_target.T
            rows = torch.arange(len(target), device=graph.device)
            graph[rows, rank_offset(len(target)) + rows] = 1.0  # each sample is its own positive
            graph = graph * (graph >= self.p.contrast_p_cutoff)
            graph = graph / graph.sum(1, keepdim=True)
            self.queue.push(
                torch.cat([all_gather_cat(f_w), all_gather_cat(f_lb)]),
                torch.cat([all_gather_cat(p_orig), all_gather_cat(one_hot(batch.y_lb, NUM_CLASSES))]),
            )
        unsup = masked_consistency(s0["logits"], target, mask, self.cfg.consistency)
        sim = (s0["proj"].float() @ all_gather_with_grad(s1["proj"].float()).T / T).softmax(-1)
        contrast = -(graph * torch.log(sim + 1e-7)).sum(1).mean()
        loss = sup + self.cfg.lambda_u * unsup + self.p.contrast_loss_ratio * contrast
        return StepOutput(
            loss,
            {
                "sup_loss": sup.detach(),
                "unsup_loss": unsup.detach(),
                "contrast_loss": contrast.detach(),
                "mask_ratio": mask.mean(),
            },
            pseudo=(target.argmax(-1), mask),
        )
