"""Losses shared by several algorithms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslfw.algorithms.base import StepBatch
from sslfw.algorithms.stats import global_sum
from sslfw.dist import world_size


def supervised_ce(logits: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """Cross-entropy of the labelled batch against its levels, or against the votes' level probabilities when the
    trainer supplied them (algorithm.sup_targets: votes)."""
    if batch.y_lb_soft is None:
        return F.cross_entropy(logits.float(), batch.y_lb)
    return -(batch.y_lb_soft * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def ordinal_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample binary cross-entropy on the K-1 cumulative probabilities P(level > k), k = 0..K-2, of a hard
    (long) or soft (prob) target: putting mass d levels away from the target costs about d cuts, not one."""
    logp = F.log_softmax(logits.float(), dim=-1)
    log_low = torch.logcumsumexp(logp, dim=-1)[:, :-1]  # log P(level <= k)
    log_high = torch.logcumsumexp(logp.flip(-1), dim=-1).flip(-1)[:, 1:]  # log P(level > k)
    t = F.one_hot(target, logits.shape[-1]).float() if target.dtype == torch.long else target.float()
    t_high = t.flip(-1).cumsum(-1).flip(-1)[:, 1:]
    return -(t_high * log_high + (1 - t_high) * log_low).sum(-1)


def masked_consistency(
    logits_s: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "ce"
) -> torch.Tensor:
    """mean_i(mask_i * loss(logits_s,i, target_i)) over the whole batch; hard (long) or soft (prob) targets; `kind`
    is "ce" (cross-entropy) or "ordinal" (ordinal_ce). The mean runs over all samples, masked or not (as FixMatch
    defines it), so equal per-rank batches make DDP's gradient average the global-batch loss."""
    if kind == "ordinal":
        per_sample = ordinal_ce(logits_s, target)
    elif target.dtype == torch.long:
        per_sample = F.cross_entropy(logits_s.float(), target, reduction="none")
    else:
        per_sample = -(target * F.log_softmax(logits_s.float(), dim=-1)).sum(-1)
    return (per_sample * mask).mean()


def score_mse(pred: torch.Tensor, mos: torch.Tensor) -> torch.Tensor:
    """Squared error of predicted against true MOS over the labelled images that have a MOS (a hand label may have
    none), divided by the GLOBAL count of such images times the world size, so DDP's gradient average is the
    one-process mean whatever the ranks' counts."""
    known = torch.isfinite(mos)
    err = torch.where(known, pred.float() - torch.nan_to_num(mos.float()), torch.zeros_like(pred, dtype=torch.float32))
    count = global_sum(known.sum().float()).clamp_min(1)
    return (err**2).sum() * world_size() / count


def scores(out: dict[str, torch.Tensor], on_levels: bool) -> torch.Tensor:
    """The continuous prediction a score-based algorithm works on: the score head's MOS, or (on_levels) the
    classifier's expected level sum_k k p_k, which keeps the 5-level head and its cross-entropy."""
    if on_levels:
        probs = out["logits"].float().softmax(-1)
        return probs @ torch.arange(probs.shape[-1], device=probs.device, dtype=torch.float32)
    return out["mos"].float()


def supervised_score_loss(lb: dict[str, torch.Tensor], batch: StepBatch, on_levels: bool) -> torch.Tensor:
    """Cross-entropy on the levels (on_levels) or squared error on the MOS (score_mse)."""
    return supervised_ce(lb["logits"], batch) if on_levels else score_mse(lb["mos"], batch.mos_lb)


def levels_of(score: torch.Tensor, on_levels: bool, edges: tuple[float, ...]) -> torch.Tensor:
    """The level a continuous prediction reads as: the nearest level, or the MOS through the label edges."""
    score = score.detach().float().contiguous()
    if on_levels:
        return score.round().clamp(0, len(edges)).long()
    return torch.bucketize(score, score.new_tensor(edges), right=True)
