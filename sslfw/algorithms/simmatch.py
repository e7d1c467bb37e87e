"""SimMatch (Zheng et al., CVPR 2022): semantic and instance similarity against a bank of labelled features.

The bank holds one unit-norm projection and label per labelled training sample (LabelledBank). With T the
temperature and, following the paper, weak-view and bank features from the EMA teacher:
    p~ = DA(softmax(z_w))                              uniform-target alignment (as CoMatch)
    q = softmax(f_w B^T / T)                           instance similarity to every bank entry
    q^ = normalize(q * p~[:, labels])                  unfolding: instance similarity scaled by class belief
    p^ = alpha p~ + (1-alpha) sum_k q_k onehot(labels_k)   aggregation: class belief refined by neighbours
    L_in = mean_i sum_k -q^_ik log softmax(f_s B^T / T)_ik
    m = [max p^ >= p_cutoff];  L = CE(z_lb, y) + lambda_u mean(m CE(z_s, p^)) + in_loss_ratio L_in
Until every labelled sample has been written to the bank once, L_in = 0 and p^ = p~ (USB: its first "epoch").
After the loss, the bank takes the gathered (index, teacher feature of x_lb, label) rows; a repeated index keeps
its last row.

USB deviations (docs/ALGORITHMS.md): USB takes the weak view from the student even with an EMA teacher (the
teacher only re-encodes the labelled batch for the bank, assigned directly); without a teacher it updates the bank
with an EMA whose normalisation runs across samples (dim bug: the bank's scale then depends on batch x world size);
its DA queue averages all rows, zeros included; it starts at a fixed epoch. `usb_compat: true` restores all but the
start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslfw.algorithms.bank import DistAlignQueue, LabelledBank
from sslfw.algorithms.base import Algorithm, DataInfo, StepBatch, StepContext, StepOutput, forward_views, register
from sslfw.algorithms.losses import masked_consistency, supervised_ce
from sslfw.algorithms.stats import one_hot
from sslfw.config import AlgorithmConfig
from sslfw.data.labels import NUM_CLASSES
from sslfw.dist import all_gather_cat


@register
class SimMatch(Algorithm):
    name = "simmatch"
    projection = True

    @dataclass
    class Params:
        p_cutoff: float = 0.95
        T: float = 0.1  # USB cifar/stl ViT configs; the original used 0.1 for teacher and student
        smoothing_alpha: float = 0.9
        in_loss_ratio: float = 1.0
        da_len: int = 32
        use_ema_teacher: bool = True  # weak view and bank features from the EMA teacher when one exists
        usb_compat: bool = False

    def __init__(self, cfg: AlgorithmConfig, data: DataInfo):
        super().__init__(cfg, data)
        self.bank = LabelledBank(data.num_labelled, data.proj_dim)
        self.da = DistAlignQueue(self.p.da_len, NUM_CLASSES, usb_compat=self.p.usb_compat)

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        lb, w, s = forward_views(model, [batch.x_lb, batch.x_ulb_w[0], batch.x_ulb_s[0]], self.no_grad_views(ctx))
        sup = supervised_ce(lb["logits"], batch)
        teacher = ctx.teacher if self.p.use_ema_teacher else None
        bank = self.bank.feats.clone()  # a snapshot: the bank is rewritten below, before backward needs it
        with torch.no_grad():
            if teacher is None:
                t_lb, t_w = lb, w
            elif self.p.usb_compat:  # USB: the teacher re-encodes only the labelled batch for the bank
                t_lb, t_w = forward_views(teacher, [batch.x_lb])[0], w
            else:
                t_lb, t_w = forward_views(teacher, [batch.x_lb, batch.x_ulb_w[0]])
            f_w, f_lb = t_w["proj"].detach().float(), t_lb["proj"].detach().float()
            p_w = self.da.align(t_w["logits"].detach().float().softmax(-1))
            target, unfolded = p_w, None
            if self.bank.full:
                q = (f_w @ bank.T / self.p.T).softmax(-1)
                unfolded = q * p_w[:, self.bank.labels]
                unfolded = unfolded / unfolded.sum(1, keepdim=True)
                aggregated = q @ one_hot(self.bank.labels, NUM_CLASSES)
                target = self.p.smoothing_alpha * p_w + (1 - self.p.smoothing_alpha) * aggregated
            mask = (target.max(-1).values >= self.p.p_cutoff).float()
        unsup = masked_consistency(s["logits"], target, mask, self.cfg.consistency)
        if unfolded is not None:
            log_s = F.log_softmax(s["proj"].float() @ bank.T / self.p.T, dim=-1)
            in_loss = -(unfolded * log_s).sum(1).mean()
        else:
            in_loss = s["proj"].sum() * 0.0  # keeps the projection in the graph for DDP
        loss = sup + self.cfg.lambda_u * unsup + self.p.in_loss_ratio * in_loss
        # USB blends (with its normalisation bug) only on its small-data path, without a teacher; with one it
        # assigns the teacher's features directly, as we always do.
        blend = self.p.usb_compat and teacher is None
        self.bank.update(
            all_gather_cat(batch.idx_lb), all_gather_cat(f_lb), all_gather_cat(batch.y_lb), usb_compat=blend
        )
        return StepOutput(
            loss,
            {
                "sup_loss": sup.detach(),
                "unsup_loss": unsup.detach(),
                "in_loss": in_loss.detach(),
                "mask_ratio": mask.mean(),
            },
            pseudo=(target.argmax(-1), mask),
        )
