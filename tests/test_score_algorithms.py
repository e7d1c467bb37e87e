"""The algorithms made for scores and ranks (regression, Mean Teacher, RankUp, RankUp + RDA): hand-computed losses,
pair targets, masks and distribution alignment. World-size invariance and exact resume run in test_algorithms.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslfw.algorithms.base import StepBatch, StepContext
from sslfw.algorithms.meanteacher import sigmoid_rampup
from sslfw.algorithms.rankup import quantile_map
from tests.test_algorithms import make

NAN = float("nan")


class ScoresAreInputs(nn.Module):
    """Column 0 of the input is the predicted MOS, column 1 the rank score: a test picks every output exactly."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mos": x[:, 0], "rank": x[:, 1:2], "logits": x, "feat": x}


def rows(*r: list[float]) -> torch.Tensor:
    return torch.tensor(r, dtype=torch.float32)


def batch(x_lb, mos_lb, x_w=None, x_s=None, idx_ulb=None) -> StepBatch:
    n = len(x_lb)
    b = StepBatch(x_lb, torch.zeros(n, dtype=torch.long), torch.arange(n), mos_lb=torch.tensor(mos_lb))
    if x_w is not None:
        b.x_ulb_w, b.x_ulb_s, b.idx_ulb = [x_w], [x_s], idx_ulb if idx_ulb is not None else torch.arange(len(x_w))
    return b


def test_regression_is_the_mean_squared_error_over_the_images_with_a_mos():
    out = make("regression").step(ScoresAreInputs(), batch(rows([3.0, 0], [2.0, 0], [4.0, 0]), [3.5, NAN, 2.0]),
                                  StepContext(0, 10, None))  # fmt: skip
    assert float(out.loss) == pytest.approx((0.5**2 + 2.0**2) / 2)  # the hand label without a MOS counts 0


def test_mean_teacher_pulls_the_strong_score_to_the_teachers_weak_score_with_a_ramp():
    class Teacher(nn.Module):  # the EMA teacher's weak-view scores: 1 above the student's
        def forward(self, x):
            return {"mos": x[:, 0] + 1.0}

    alg = make("meanteacher", rampup=0.5)
    b = batch(rows([3.0, 0]), [3.0], x_w=rows([2.0, 0], [4.0, 0]), x_s=rows([2.5, 0], [4.0, 0]))
    w = math.exp(-5 * (1 - 4 / 5) ** 2)  # step 4 of 10, ramp over 5 steps
    out = alg.step(ScoresAreInputs(), b, StepContext(4, 10, Teacher()))
    unsup = ((2.5 - 3.0) ** 2 + (4.0 - 5.0) ** 2) / 2
    assert float(out.logs["unsup_loss"]) == pytest.approx(unsup)
    assert float(out.loss) == pytest.approx(w * unsup) and sigmoid_rampup(4, 10, 0.5) == pytest.approx(w)
    pi = alg.step(ScoresAreInputs(), b, StepContext(10, 10, None))  # no teacher: the student's weak view (Pi-model)
    assert float(pi.logs["unsup_loss"]) == pytest.approx(((2.5 - 2.0) ** 2 + 0) / 2)
    assert pi.pseudo[0].tolist() == [1, 4] and pi.pseudo[1].tolist() == [1.0, 1.0]  # levels of MOS 2.0 and 4.0


def bce(logit: float, target: float) -> float:
    return -(target * math.log(1 / (1 + math.exp(-logit))) + (1 - target) * math.log(1 - 1 / (1 + math.exp(-logit))))


def test_rankup_pairs_order_labels_and_pseudo_labels_only_confident_unlabelled_pairs():
    alg = make("rankup", p_cutoff=0.8, arc_loss_ratio=1.0, arc_ulb_loss_ratio=2.0)
    x_lb = rows([3.0, 0.5], [3.0, -0.5], [3.0, 0.0])  # mos head 3 (reg loss known), rank scores 0.5 / -0.5 / 0
    mos = [4.0, 2.0, NAN]  # the third has no MOS: no labelled pair
    x_w = rows([0.0, 2.0], [0.0, 0.0], [0.0, 0.1])  # weak rank scores: pairs (0,1), (0,2) confident (sigmoid 2 = .88)
    x_s = rows([0.0, 1.0], [0.0, 0.0], [0.0, 0.0])
    out = alg.step(ScoresAreInputs(), batch(x_lb, mos, x_w, x_s), StepContext(0, 10, None))
    reg = ((3 - 4) ** 2 + (3 - 2) ** 2) / 2
    # labelled ordered pairs (i, j): d_j - d_i with target [MOS_j > MOS_i]: (0,1): -1, target 0; (1,0): +1, target 1
    arc = (bce(-1.0, 0.0) + bce(1.0, 1.0)) / 2
    # unlabelled: 3 x 2 ordered pairs; confident: (0,1), (1,0), (0,2), (2,0); strong differences d_j - d_i
    arc_u = (bce(-1.0, 0.0) + bce(1.0, 1.0) + bce(-1.0, 0.0) + bce(1.0, 1.0)) / 6
    assert float(out.logs["sup_loss"]) == pytest.approx(reg)
    assert float(out.logs["arc_loss"]) == pytest.approx(arc, rel=1e-5)
    assert float(out.logs["unsup_loss"]) == pytest.approx(arc_u, rel=1e-5)
    assert float(out.loss) == pytest.approx(reg + arc + 2.0 * arc_u, rel=1e-5)
    assert out.pseudo[1].tolist() == [1.0, 1.0, 1.0] and float(out.logs["pair_mask_ratio"]) == pytest.approx(4 / 6)


def test_rda_moves_each_score_to_the_labelled_quantile_at_its_rank():
    pool = torch.tensor([NAN, 0.3, 0.1, 0.2])
    assert quantile_map(torch.tensor([0.1, 0.2, 0.3]), pool, torch.tensor([1.0, 5.0, 3.0, NAN])).tolist() == [1, 3, 5]
    assert quantile_map(torch.tensor([0.1, 0.3]), pool, torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
    assert quantile_map(torch.tensor([0.1, 0.2, 0.3]), pool, torch.tensor([1.0, 2.0])).tolist() == [1.0, 1.5, 2.0]
    alg = make("rankup_rda", p_cutoff=0.99, rda_warmup=0.5)
    x = rows([3.0, 0], [3.5, 0])
    b = batch(x, [2.0, 4.0], x_w=x.clone(), x_s=x.clone(), idx_ulb=torch.tensor([1, 2]))
    out = alg.step(ScoresAreInputs(), b, StepContext(2, 10, None))  # labelled MOS 2, 4; weak scores 3.0, 3.5
    assert float(out.logs["rda_loss"]) == pytest.approx(((3.0 - 2.0) ** 2 + (3.5 - 4.0) ** 2) / 2)
    assert out.logs["rda_weight"] == pytest.approx(2 / 5)
    assert alg.pool_score[1:3].tolist() == [3.0, 3.5] and alg.lb_mos[:2].tolist() == [2.0, 4.0]
    assert torch.isnan(alg.pool_score[0]) and "pool_score" in alg.state_dict()  # checkpointed with the algorithm


def test_the_levels_variants_work_on_the_classifiers_expected_level_with_cross_entropy():
    from sslfw.algorithms import get_algorithm

    class Teacher(nn.Module):
        def forward(self, x):
            return {"logits": x * 2}

    assert not get_algorithm("meanteacher_levels").score_head and not get_algorithm("rankup_levels").score_head
    alg = make("meanteacher_levels", rampup=0.0)
    z_lb, z_w, z_s = rows([2.0, 0, 0, 0, 0]), rows([0.0, 0, 3.0, 0, 0]), rows([0.0, 0, 0, 1.0, 0])
    out = alg.step(ScoresAreInputs(), StepBatch(z_lb, torch.tensor([0]), torch.tensor([0]), [z_w], [z_s]),
                   StepContext(5, 10, Teacher()))  # fmt: skip
    levels = torch.arange(5.0)
    expected = (z_s.softmax(-1) @ levels - (z_w * 2).softmax(-1) @ levels) ** 2
    sup = torch.nn.functional.cross_entropy(z_lb, torch.tensor([0]))
    assert float(out.logs["unsup_loss"]) == pytest.approx(float(expected.mean()), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(sup + expected.mean()), rel=1e-5)
    assert out.pseudo[0].tolist() == [2]  # the teacher's expected level, rounded
    with pytest.raises(Exception, match="no MOS head to align"):
        make("rankup_levels", rda=True)
