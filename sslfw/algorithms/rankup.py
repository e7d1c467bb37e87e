"""RankUp (Huang, Fu, Tsao, NeurIPS 2024, arXiv 2410.22124): MOS regression plus an auxiliary ranking classifier
trained FixMatch-style on pairs; `rankup_rda` adds Regression Distribution Alignment.

The ranking classifier gives every image one rank score d (RankUp's two-way head on the difference of two images'
outputs is the same model: its softmax over (a_j - a_i) depends only on d = a[0] - a[1]), and
    P(j better than i) = sigmoid(d_j - d_i)
over every ordered pair i != j of the GLOBAL batch (gathered across ranks), so the pair statistics do not change
with the number of ranks. With s the score head, M the labelled MOS, q = max(P, 1 - P) on the weak views:
    L_reg  = mean_lb (s - M)^2
    L_arc  = mean_pairs BCE(d_j - d_i, (1 + sign(M_j - M_i)) / 2)        (labelled pairs with both MOS known)
    L_arcu = mean_pairs [q >= p_cutoff] BCE(d^s_j - d^s_i, [P^w >= 1/2]) (unlabelled pairs, strong views)
    L = L_reg + arc_loss_ratio * (L_arc + arc_ulb_loss_ratio * L_arcu) [+ lambda_u * w(t) * L_rda]
`rankup_levels` keeps the 5-level classifier (cross-entropy on the labels) in place of the MOS regression, so the
ranking classifier is tried beside the head that fine-tunes best.
RDA (rankup_rda): every pool image's latest weak-view score is kept in a table, every labelled image's MOS in
another; a weak-view score is aligned by moving it to the labelled MOS distribution's quantile at its rank among
the table's scores, and
    L_rda = mean_i (s(x_w,i) - aligned_i)^2,   w(t) = lambda_u * min(1, t / (rda_warmup * T))
pulls the weak-view scores towards the labelled distribution. RankUp's code sorts its table every 1,024 steps and
uses the aligned values only from the second epoch on; aligning each batch against the current table gives every
image a target on its first visit (runs here see the pool once or twice). Tables are filled from gathered
batches, so every rank holds the same ones, and they are checkpointed with the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslfw.algorithms.base import Algorithm, DataInfo, StepBatch, StepContext, StepOutput, forward_views, register
from sslfw.algorithms.losses import levels_of, scores, supervised_score_loss
from sslfw.config import AlgorithmConfig
from sslfw.dist import all_gather_cat, all_gather_with_grad, rank_offset, world_size
from sslfw.errors import ConfigError


def pair_loss(d_local: torch.Tensor, d_all: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """This rank's share of sum_{i,j} weight_ij BCE(d_j - d_i, target_ij) over the rows i it owns: the rows of
    `target`/`weight` are the local images, the columns the global batch. Summed over ranks (DDP, with the gathered
    columns' gradients returned to their owners) this is the global sum."""
    diff = d_all[None, :].float() - d_local[:, None].float()
    return (F.binary_cross_entropy_with_logits(diff, target, reduction="none") * weight).sum()


def off_diagonal(n_local: int, n_all: int, device: torch.device) -> torch.Tensor:
    """1.0 for pairs (local row i, global column j) with i and j different images."""
    rows = torch.arange(n_local, device=device) + rank_offset(n_local)
    return (rows[:, None] != torch.arange(n_all, device=device)[None, :]).float()


@register
class RankUp(Algorithm):
    name = "rankup"
    score_head = True
    extra_heads = {"rank": 1}

    @dataclass
    class Params:
        p_cutoff: float = 0.95  # confidence a pair's weak-view order needs to become a pseudo-label
        arc_loss_ratio: float = 1.0  # weight of the ranking classifier's losses (RankUp's cls_loss_ratio)
        arc_ulb_loss_ratio: float = 1.0  # weight of its unlabelled pairs (RankUp's cls_ulb_loss_ratio)
        rda: bool = False  # Regression Distribution Alignment (rankup_rda turns it on)
        rda_warmup: float = 0.4  # share of the steps over which the RDA loss weight rises linearly to lambda_u

    def __init__(self, cfg: AlgorithmConfig, data: DataInfo):
        super().__init__(cfg, data)
        if self.p.rda and not self.score_head:
            raise ConfigError(f"algorithm.params.rda: {self.name} has no MOS head to align; use rankup_rda")
        if self.p.rda:
            self.register_buffer("pool_score", torch.full((data.num_unlabelled,), float("nan")))
            self.register_buffer("lb_mos", torch.full((data.num_labelled,), float("nan")))

    def no_grad_views(self, ctx: StepContext) -> tuple[int, ...]:
        return () if self.p.rda else super().no_grad_views(ctx)  # RDA's loss pulls the weak view's score

    def step(self, model: nn.Module, batch: StepBatch, ctx: StepContext) -> StepOutput:
        lb, w, s = forward_views(model, [batch.x_lb, batch.x_ulb_w[0], batch.x_ulb_s[0]], self.no_grad_views(ctx))
        reg = supervised_score_loss(lb, batch, not self.score_head)
        scale = float(world_size())  # each rank owns its rows' pairs; DDP averages, so the shares sum to the mean

        d_lb, mos = lb["rank"].squeeze(-1), all_gather_cat(batch.mos_lb.float())
        d_lb_all = all_gather_with_grad(d_lb)
        mine = mos[rank_offset(len(d_lb)) : rank_offset(len(d_lb)) + len(d_lb)]
        known = off_diagonal(len(d_lb), len(mos), mos.device) * (mine[:, None].isfinite() & mos[None].isfinite())
        target = (1 + torch.sign(torch.nan_to_num(mos)[None] - torch.nan_to_num(mine)[:, None])) / 2
        n_known = mos.isfinite().sum().float()  # the gathered MOS are the same on every rank: so is this count
        arc = pair_loss(d_lb, d_lb_all, target, known) * scale / (n_known * (n_known - 1)).clamp_min(1)

        with torch.no_grad():
            d_w = w["rank"].squeeze(-1).detach().float()
            d_w_all = all_gather_cat(d_w)
            p = torch.sigmoid(d_w_all[None] - d_w[:, None])
            pairs = off_diagonal(len(d_w), len(d_w_all), d_w.device)
            mask = (torch.maximum(p, 1 - p) >= self.p.p_cutoff).float() * pairs
        d_s = s["rank"].squeeze(-1)
        n_pairs = float(len(d_w_all) * (len(d_w_all) - 1))
        arc_u = pair_loss(d_s, all_gather_with_grad(d_s), (p >= 0.5).float(), mask) * scale / max(n_pairs, 1.0)
        loss = reg + self.p.arc_loss_ratio * (arc + self.p.arc_ulb_loss_ratio * arc_u)

        score_w = scores(w, not self.score_head)
        used = (mask.sum(1) > 0).float()  # an image is used when one of its pairs passed
        logs = {"sup_loss": reg.detach(), "arc_loss": arc.detach(), "unsup_loss": arc_u.detach(),
                "mask_ratio": used.mean(), "pair_mask_ratio": mask.sum() / pairs.sum().clamp_min(1)}  # fmt: skip
        if self.p.rda:
            rda = self.align(batch, score_w)
            weight = self.cfg.lambda_u * min(1.0, ctx.step / max(self.p.rda_warmup * ctx.total_steps, 1e-9))
            loss = loss + weight * rda
            logs |= {"rda_loss": rda.detach(), "rda_weight": weight}
        level = levels_of(score_w, not self.score_head, self.data.edges)
        return StepOutput(loss, logs, pseudo=(level, used))

    def align(self, batch: StepBatch, score_w: torch.Tensor) -> torch.Tensor:
        """Record this step's scores in the tables (gathered: the same on every rank) and return
        mean_i (score_w,i - aligned_i)^2 over the local batch, aligned_i = quantile_map(score_w,i)."""
        with torch.no_grad():
            self.pool_score[all_gather_cat(batch.idx_ulb)] = all_gather_cat(score_w.detach())
            self.lb_mos[all_gather_cat(batch.idx_lb)] = all_gather_cat(batch.mos_lb.float())
            target = quantile_map(score_w.detach(), self.pool_score, self.lb_mos)
        return ((score_w - target) ** 2).mean()


def quantile_map(values: torch.Tensor, pool: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each value moved to the same quantile of `reference` that it holds among `pool` (finite entries only):
    the empirical CDF of the pool, then the reference's inverse CDF, interpolating between order statistics."""
    seen = pool[pool.isfinite()].sort().values
    ref = reference[reference.isfinite()].sort().values
    if len(seen) == 0 or len(ref) == 0:
        return values.clone()
    rank = torch.searchsorted(seen, values.float().contiguous()).clamp_max(len(seen) - 1).double()
    pos = rank / max(len(seen) - 1, 1) * (len(ref) - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(len(ref) - 1)
    frac = (pos - lo).to(ref.dtype)
    return ref[lo] * (1 - frac) + ref[hi] * frac


@register
class RankUpRDA(RankUp):
    name = "rankup_rda"

    @dataclass
    class Params(RankUp.Params):
        rda: bool = True


@register
class RankUpLevels(RankUp):
    """The ranking classifier beside the 5-level classifier (cross-entropy on the labels) instead of a MOS head."""

    name = "rankup_levels"
    score_head = False
