"""SSL algorithms: hand-computed masks, targets and losses; world-size invariance with real gloo processes."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslfw import trace
from sslfw.algorithms import get_algorithm, resolve_params
from sslfw.algorithms.base import DataInfo, StepBatch, StepContext
from sslfw.config import AlgorithmConfig
from tests.helpers import ROOT, child_env, torchrun


class LogitsAreInputs(nn.Module):
    """A model whose output logits are its input: lets a test choose the logits of every view exactly."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x, "feat": x}


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def make(name: str, **params):
    cfg = AlgorithmConfig(name=name, params=params)
    resolve_params(cfg)
    return get_algorithm(name)(cfg, DataInfo(num_labelled=8, num_unlabelled=16, proj_dim=4))


CTX = StepContext(step=5, total_steps=10, teacher=None)


def test_fixmatch_mask_targets_and_loss():
    alg = make("fixmatch", p_cutoff=0.9)
    z_lb = logits([4.0, 0, 0, 0, 0])
    z_w = logits([5.0, 0, 0, 0, 0], [1.0, 0.5, 0, 0, 0])  # confident (p=0.974) / not
    z_s = logits([1.0, 2.0, 0, 0, 0], [0.0, 0, 3.0, 0, 0])
    out = alg.step(LogitsAreInputs(), StepBatch(z_lb, torch.tensor([0]), torch.tensor([0]), [z_w], [z_s]), CTX)
    sup = -math.log(math.exp(4) / (math.exp(4) + 4))
    ce0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + 3))
    assert out.logs["mask_ratio"] == pytest.approx(0.5)
    assert float(out.logs["unsup_loss"]) == pytest.approx(ce0 / 2)  # mean over the whole batch, masked row only
    assert float(out.loss) == pytest.approx(sup + ce0 / 2, rel=1e-5)
    soft = make("fixmatch", p_cutoff=0.9, hard_label=False, T=0.5)
    compat = make("fixmatch", p_cutoff=0.9, hard_label=False, usb_compat=True)
    batch = StepBatch(z_lb, torch.tensor([0]), torch.tensor([0]), [z_w], [z_s])
    t = torch.softmax(z_w[0] / 0.5, -1)
    want = -(t * torch.log_softmax(z_s[0], -1)).sum().item() / 2
    assert float(soft.step(LogitsAreInputs(), batch, CTX).logs["unsup_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(compat.step(LogitsAreInputs(), batch, CTX).logs["unsup_loss"]) != pytest.approx(want, rel=1e-3)


def test_adamatch_alignment_relative_threshold_and_warmup():
    alg = make("adamatch", p_cutoff=0.9, ema_p=0.5)
    z_lb = logits([3.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0])
    z_w = logits([2.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0])
    batch = StepBatch(z_lb, torch.tensor([0, 2]), torch.tensor([0, 1]), [z_w], [z_w.clone()])
    out = alg.step(LogitsAreInputs(), batch, CTX)
    p_lb, p_w = z_lb.softmax(-1), z_w.softmax(-1)
    assert torch.allclose(alg.p_model, p_w.mean(0))  # first call: the batch mean
    assert torch.allclose(alg.p_target, 0.5 * torch.full((5,), 0.2) + 0.5 * p_lb.mean(0))
    assert float(out.logs["threshold"]) == pytest.approx(0.9 * p_lb.max(-1).values.mean().item(), rel=1e-6)
    assert alg.unsup_weight(StepContext(0, 10, None)) == pytest.approx(0.0)
    assert alg.unsup_weight(StepContext(5, 10, None)) == pytest.approx(1.0)
    assert make("adamatch", usb_compat=True).unsup_weight(StepContext(0, 10, None)) == 1.0


def test_freematch_state_updates_mask_and_fairness_sign():
    alg = make("freematch", ema_p=0.5)
    z_w = logits([6.0, 0, 0, 0, 0], [0, 0, 0.2, 0, 0])
    batch = StepBatch(
        logits([1.0, 0, 0, 0, 0]),
        torch.tensor([0]),
        torch.tensor([0]),
        [z_w],
        [logits([2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0])],
    )
    out = alg.step(LogitsAreInputs(), batch, CTX)
    p_w = z_w.softmax(-1)
    conf = p_w.max(-1).values
    assert float(alg.time_p) == pytest.approx(0.5 * 0.2 + 0.5 * conf.mean().item(), rel=1e-6)
    assert torch.allclose(alg.p_model, 0.5 * 0.2 + 0.5 * p_w.mean(0))
    assert torch.allclose(alg.label_hist, 0.5 * 0.2 + 0.5 * torch.tensor([0.5, 0, 0.5, 0, 0]))
    thresh = alg.time_p * alg.p_model[p_w.argmax(-1)] / alg.p_model.max()
    assert out.logs["mask_ratio"] == pytest.approx((conf >= thresh).float().mean().item())
    assert float(out.logs["fair_loss"]) <= 0  # minus a cross-entropy


def test_freematch_warm_start_takes_the_first_batch_and_usb_start_stays_near_one_over_c():
    z_w = logits([6.0, 0, 0, 0, 0], [0, 0, 0.2, 0, 0])
    batch = StepBatch(logits([1.0, 0, 0, 0, 0]), torch.tensor([0]), torch.tensor([0]), [z_w], [z_w.clone()])
    conf = z_w.softmax(-1).max(-1).values.mean().item()
    warm, usb = make("freematch"), make("freematch", warm_start=False)
    for step in range(3):  # identical batches: the warm-started threshold is their confidence from the first step
        warm.step(LogitsAreInputs(), batch, StepContext(step, 10, None))
        usb.step(LogitsAreInputs(), batch, StepContext(step, 10, None))
        assert float(warm.time_p) == pytest.approx(conf, rel=1e-6)
    assert float(usb.time_p) == pytest.approx(conf + (0.2 - conf) * 0.999**3, rel=1e-6)
    torch.testing.assert_close(warm.label_hist, usb.label_hist)  # class statistics keep USB's uniform start


def test_ordinal_consistency_charges_by_distance_and_matches_hand_values():
    from sslfw.algorithms.losses import masked_consistency, ordinal_ce

    p = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]])
    z = p.log()
    # Hard target 2: cuts k=0,1 want P(>k) = 1, cuts k=2,3 want P(>k) = 0.
    hand = -(math.log(0.9) + math.log(0.7) + math.log(0.7) + math.log(0.9))
    assert float(ordinal_ce(z, torch.tensor([2]))) == pytest.approx(hand, rel=1e-5)
    soft = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]])  # P(>2) = 0.5 at cut 2
    hand_soft = -(math.log(0.9) + math.log(0.7) + 0.5 * math.log(0.3) + 0.5 * math.log(0.7) + math.log(0.9))
    assert float(ordinal_ce(z, soft)) == pytest.approx(hand_soft, rel=1e-5)
    # A confident prediction one level off costs less than one three levels off; plain CE charges both the same.
    near, far = logits([0, 0, 0, 8.0, 0]), logits([8.0, 0, 0, 0, 0])
    target, mask = torch.tensor([2]), torch.ones(1)
    assert masked_consistency(near, target, mask, "ordinal") < masked_consistency(far, target, mask, "ordinal")
    assert masked_consistency(near, target, mask) == pytest.approx(float(masked_consistency(far, target, mask)))


SSL = ["fixmatch", "adamatch", "freematch", "comatch", "simmatch", "crmatch"]
# Made for scores and ranks. The *_levels variants share every cross-rank line with their MOS twins (only the
# score differs), so each multi-process path runs once: pairs (rankup), tables (rankup_rda), a teacher target.
SCORES = ["meanteacher", "rankup", "rankup_rda"]


@pytest.fixture(scope="module")
def invariance_runs(tmp_path_factory) -> dict[int, Path]:
    """Every algorithm's steps under torchrun with 1 and with 2 gloo processes: one launch each for all of them."""
    outs = {}
    for nproc in (1, 2):
        out = outs[nproc] = tmp_path_factory.mktemp(f"invariance{nproc}")
        script = str(ROOT / "tests" / "dist" / "algo_invariance.py")
        proc = subprocess.run(torchrun(nproc, script, ",".join(SSL + SCORES), str(out), "4"), env=child_env(),
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    return outs


@pytest.mark.slow  # real processes (DDP, signals, kills)
@pytest.mark.parametrize("name", SSL + SCORES)
def test_two_ranks_equal_one_rank_with_the_global_batch(name, invariance_runs):
    results = {
        n: [json.loads((out / f"rank{r}-{name}.json").read_text()) for r in range(n)]
        for n, out in invariance_runs.items()
    }
    one, (r0, r1) = results[1][0], results[2]
    assert any(r["logs"]["mask_ratio"] > 0 for r in one)  # the unlabelled terms were really exercised
    active = {
        "comatch": "contrast_loss",
        "simmatch": "in_loss",
        "crmatch": "rot_loss",
        "freematch": "fair_loss",
        "meanteacher": "unsup_loss",
        "rankup": "unsup_loss",
        "rankup_rda": "rda_loss",
    }
    if name in active:
        assert any(r["logs"][active[name]] != 0 for r in one)  # each term acted on some step
    for a, b, c in zip(one, r0, r1):
        assert b["hash"] == c["hash"]  # state identical on both ranks
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(b["grads"], a["grads"], rtol=1e-4, atol=1e-6)
        for k in a["state"]:
            np.testing.assert_allclose(b["state"][k], a["state"][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "name", ["supervised", "regression", *SSL, "meanteacher_levels", "rankup_levels", "rankup_rda"]
)
def test_trains_checkpoints_and_resumes_to_identical_state(name, small_shards, tmp_path, monkeypatch):
    from sslfw import ckpt
    from sslfw.preempt import EXIT_PREEMPTED
    from sslfw.runconfig import load_config
    from sslfw.train import train
    from tests.helpers import tiny_overrides

    extra = {"algorithm.name": name, "train.steps": 6, "ckpt.every": 6, "eval.every": 0, "aug.strong": "randaugment"}
    whole = train(load_config(None, tiny_overrides(small_shards, tmp_path / "whole", **extra)))
    monkeypatch.setenv("SSLFW_FAULT_SIGNAL", "0:2")  # a signal during step index 2: stops after 3 steps
    stopped = train(load_config(None, tiny_overrides(small_shards, tmp_path / "cut", **extra)))
    monkeypatch.delenv("SSLFW_FAULT_SIGNAL")
    stale = tmp_path / "cut" / trace.DIR / "r0-upto-0000005.npz"  # as if a killed run had got past its checkpoint
    if get_algorithm(name).uses_unlabelled:
        stale.write_bytes((tmp_path / "cut" / trace.DIR / "r0-upto-0000003.npz").read_bytes())
    resumed = train(load_config(None, tiny_overrides(small_shards, tmp_path / "cut", **extra)))
    assert whole["exit_code"] == 0 and stopped["exit_code"] == EXIT_PREEMPTED and stopped["step"] == 3
    assert resumed["exit_code"] == 0 and resumed["step"] == 6
    a, b = (ckpt.load(ckpt.latest(tmp_path / d))[0] for d in ("whole", "cut"))
    for part in ("model", "algorithm"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:  # exactly equal; NaN marks what an algorithm's tables have not seen yet
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0, equal_nan=True, msg=f"{part}.{k}")
    assert all(torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]) for k in a["ema"]["module"])
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    # The pseudo-label trace: every step's unlabelled batch, its share used = the logged mask ratio, and the
    # interrupted run's trace (stale chunk pruned on resume) equal to the uninterrupted one's.
    data = ckpt.info(ckpt.latest(tmp_path / "whole"))["data"]  # the pack both trained on
    t, t_cut = trace.load(tmp_path / "whole", data), trace.load(tmp_path / "cut", data)
    if not get_algorithm(name).uses_unlabelled:
        assert t is None and t_cut is None
        return
    assert not stale.exists() and sorted(np.unique(t["step"])) == [1, 2, 3, 4, 5, 6]
    mask = {r["step"]: r["train/mask_ratio"] for r in rows if "train/mask_ratio" in r}
    for step, m in mask.items():
        assert t["used"][t["step"] == step].mean() == pytest.approx(m, abs=1e-6)
    order, order_cut = np.lexsort((t["key"], t["step"])), np.lexsort((t_cut["key"], t_cut["step"]))
    for k in ("step", "key", "label", "used"):
        assert np.array_equal(t[k][order], t_cut[k][order_cut]), k


class LogitsAndProj(nn.Module):
    """Inputs of width 5 + D: the first 5 columns are the logits, the rest (normalised) the projection."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x[:, :5], "proj": torch.nn.functional.normalize(x[:, 5:], dim=1), "feat": x}


def test_ring_queue_wraps_without_truncating_and_keeps_the_newest():
    from sslfw.algorithms.bank import RingQueue

    q = RingQueue(5, 2, 5)
    q.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]]), torch.eye(5)[:3])
    assert not q.full
    q.push(torch.tensor([[0, 4.0], [0, 5], [0, 6], [0, 7]]), torch.eye(5)[:4])
    assert q.full and int(q.ptr) == 2
    assert q.feats.tolist() == [[0, 1], [0, 1], [1, 0], [0, 1], [0, 1]]  # rows 0,1 overwritten, unit norm
    assert q.probs.argmax(1).tolist() == [2, 3, 2, 0, 1]
    q.push(torch.arange(14.0).view(7, 2) + 1, torch.eye(5)[torch.arange(7) % 5])
    # 7 rows labelled 0,1,2,3,4,0,1 written one by one from slot 2 leave the newest five in slots 4,0,1,2,3
    assert q.probs.argmax(1).tolist() == [3, 4, 0, 1, 2] and int(q.ptr) == 4


def test_labelled_bank_last_writer_and_usb_compat_scale():
    from sslfw.algorithms.bank import LabelledBank

    bank = LabelledBank(4, 2)
    bank.update(torch.tensor([1, 3, 1]), torch.tensor([[3.0, 4], [1, 0], [0, 2]]), torch.tensor([2, 4, 0]))
    assert bank.feats[1].tolist() == [0, 1] and bank.labels.tolist()[1] == 0  # last row for index 1 wins
    assert bank.written.tolist() == [False, True, False, True] and not bank.full
    bank.update(torch.tensor([0, 2]), torch.ones(2, 2), torch.tensor([1, 1]), usb_compat=True)
    assert bank.full
    assert not torch.allclose(bank.feats[[0, 2]].norm(dim=1), torch.ones(2))  # USB's dim bug: rows not unit norm


def test_distribution_alignment_queue():
    from sslfw.algorithms.bank import DistAlignQueue

    da = DistAlignQueue(3, 5)
    p = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]]).repeat(4, 1)
    assert torch.allclose(da.align(p), torch.full((4, 5), 0.2), atol=1e-5)  # skew removed towards uniform
    other = torch.full((2, 5), 0.2)
    mean = (p.mean(0) + other.mean(0)) / 2
    want = other * 0.2 / mean
    assert torch.allclose(da.align(other), want / want.sum(1, keepdim=True), atol=1e-5)


def test_comatch_targets_smoothing_and_graph_contrast():
    alg = make("comatch", p_cutoff=0.5, T=0.5, contrast_p_cutoff=0.3, queue_size=4, da_len=1, smoothing_alpha=0.6)
    g = torch.Generator().manual_seed(0)
    x_lb, x_w, x_s0, x_s1 = (torch.randn(2, 9, generator=g) * 2 for _ in range(4))
    batch = StepBatch(x_lb, torch.tensor([1, 3]), torch.tensor([0, 1]), [x_w], [x_s0, x_s1])
    m = LogitsAndProj()
    first = alg.step(m, batch, CTX)  # queue empty: the target is the aligned weak prediction
    p_w = x_w[:, :5].softmax(-1)
    p_da = p_w * 0.2 / p_w.mean(0)
    p_da = p_da / p_da.sum(1, keepdim=True)
    assert alg.queue.full  # 2 unlabelled + 2 labelled rows fill a queue of 4

    def contrast(target):
        W = target @ target.T
        W.fill_diagonal_(1)
        W = W * (W >= 0.3)
        W = W / W.sum(1, keepdim=True)
        f0, f1 = m(x_s0)["proj"], m(x_s1)["proj"]
        S = (f0 @ f1.T / 0.5).softmax(-1)
        return -(W * torch.log(S + 1e-7)).sum(1).mean()

    assert float(first.logs["contrast_loss"]) == pytest.approx(float(contrast(p_da)), rel=1e-5)
    feats, probs = alg.queue.feats.clone(), alg.queue.probs.clone()
    second = alg.step(m, batch, CTX)  # queue full: memory-smoothed target
    p_w2 = p_w * 0.2 / p_w.mean(0)  # da_len 1: the queue holds only this batch's mean
    p_w2 = p_w2 / p_w2.sum(1, keepdim=True)
    smooth = 0.6 * p_w2 + 0.4 * (m(x_w)["proj"] @ feats.T / 0.5).softmax(-1) @ probs
    assert float(second.logs["contrast_loss"]) == pytest.approx(float(contrast(smooth)), rel=1e-5)
    want_mask = (smooth.max(-1).values >= 0.5).float().mean()
    assert float(second.logs["mask_ratio"]) == pytest.approx(float(want_mask))


def test_simmatch_unfolding_aggregation_and_instance_loss():
    alg = make("simmatch", p_cutoff=0.0, T=0.5, da_len=1, smoothing_alpha=0.7)
    g = torch.Generator().manual_seed(1)
    m = LogitsAndProj()
    x_lb = torch.randn(8, 9, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    fill = StepBatch(x_lb, y, torch.arange(8), [torch.randn(2, 9, generator=g)], [torch.randn(2, 9, generator=g)])
    first = alg.step(m, fill, CTX)
    assert float(first.logs["in_loss"]) == 0 and alg.bank.full  # the bank is complete only after this write
    bank, labels = alg.bank.feats.clone(), alg.bank.labels.clone()
    x_w, x_s = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)
    out = alg.step(m, StepBatch(x_lb[:2], y[:2], torch.arange(2), [x_w], [x_s]), CTX)
    p = x_w[:, :5].softmax(-1)
    p = p * 0.2 / p.mean(0)
    p = p / p.sum(1, keepdim=True)
    q = (m(x_w)["proj"] @ bank.T / 0.5).softmax(-1)
    in_loss = 0.0
    for i in range(2):
        unfolded = torch.tensor([q[i, k] * p[i, labels[k]] for k in range(8)])
        unfolded = unfolded / unfolded.sum()
        log_s = torch.log_softmax(m(x_s)["proj"][i] @ bank.T / 0.5, -1)
        in_loss += -(unfolded * log_s).sum() / 2
    assert float(out.logs["in_loss"]) == pytest.approx(float(in_loss), rel=1e-5)
    agg = torch.stack([torch.stack([q[i, labels == c].sum() for c in range(5)]) for i in range(2)])
    target = 0.7 * p + 0.3 * agg
    want = -(target * torch.log_softmax(x_s[:, :5], -1)).sum(1).mean()  # p_cutoff 0: every row masked in
    assert float(out.logs["unsup_loss"]) == pytest.approx(float(want), rel=1e-5)


def test_crmatch_rotations_and_feature_distance():
    from sslfw.algorithms.crmatch import rotations

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    turned, labels = rotations(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(turned[2], torch.rot90(x[0], 1, dims=(-2, -1)))
    assert torch.equal(torch.rot90(turned[7], -3, dims=(-2, -1)), x[1])

    class Heads(nn.Module):
        def forward(self, v):
            return {"logits": v[:, :5], "ds": v[:, 5:7], "rot": v[:, :4]}

    alg = make("crmatch", p_cutoff=0.5, rot_loss_ratio=0.0)
    w = torch.tensor([[5.0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 0]])
    s = torch.tensor([[0.0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    out = alg.step(Heads(), StepBatch(w[:1], torch.tensor([0]), torch.tensor([0]), [w], [s]), CTX)
    assert float(out.logs["mask_ratio"]) == 0.5
    assert float(out.logs["ds_loss"]) == pytest.approx(math.cos(math.pi / 4) / 2, rel=1e-5)  # masked row only


def test_a_new_algorithm_is_one_class_plus_registration(small_shards, tmp_path):
    """FlexMatch-like needs: state sized by the unlabelled pool and two weak views; nothing in train.py changes."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from sslfw import ckpt
    from sslfw.algorithms.base import REGISTRY, Algorithm, StepOutput, Views, forward_views, register
    from sslfw.runconfig import load_config
    from sslfw.train import train
    from tests.helpers import tiny_overrides

    seen_views = []

    @register
    class ToyMatch(Algorithm):
        name = "toymatch"
        min_views = Views(weak=2, strong=1)

        @dataclass
        class Params:
            agreement_weight: float = 0.5

        def __init__(self, cfg, data):
            super().__init__(cfg, data)
            self.register_buffer("seen", torch.zeros(data.num_unlabelled, dtype=torch.long))

        def step(self, model, batch, ctx):
            seen_views.append((len(batch.x_ulb_w), len(batch.x_ulb_s)))
            lb, w0, w1 = forward_views(model, [batch.x_lb, *batch.x_ulb_w])
            self.seen[batch.idx_ulb] += 1
            agree = F.mse_loss(w0["logits"].float().softmax(-1), w1["logits"].float().softmax(-1))
            sup = F.cross_entropy(lb["logits"].float(), batch.y_lb)
            return StepOutput(sup + self.p.agreement_weight * agree, {"agree": agree.detach()})

    try:
        extra = {
            "algorithm.name": "toymatch",
            "algorithm.params.agreement_weight": 2.0,
            "train.steps": 4,
            "ckpt.every": 4,
            "eval.every": 0,
        }
        result = train(load_config(None, tiny_overrides(small_shards, tmp_path / "toy", **extra)))
    finally:
        REGISTRY.pop("toymatch")
    assert result["exit_code"] == 0 and result["step"] == 4
    assert seen_views == [(2, 1)] * 4
    state = ckpt.load(ckpt.latest(tmp_path / "toy"))
    assert int(state[0]["algorithm"]["seen"].sum()) == 4 * 8  # 4 steps x 8 unlabelled images per step
    assert state[1]["config"]["algorithm"]["params"] == {"agreement_weight": 2.0}


def test_dist_align_queue_usb_compat_averages_every_row_zeros_included():
    from sslfw.algorithms.bank import DistAlignQueue

    p = torch.tensor([[0.99996, 1e-5, 1e-5, 1e-5, 1e-5]]).repeat(2, 1)
    ours, usb = DistAlignQueue(4, 5), DistAlignQueue(4, 5, usb_compat=True)
    got_ours, got_usb = ours.align(p), usb.align(p)
    for mean, got in ((p.mean(0), got_ours), (p.mean(0) / 4, got_usb)):  # USB: 1 written row + 3 zero rows
        want = p * (0.2 + 1e-6) / (mean + 1e-6)
        assert torch.allclose(got, want / want.sum(1, keepdim=True), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(got_ours, got_usb, rtol=1e-3, atol=0)  # the zeros matter for a skewed class


def test_simmatch_usb_compat_takes_the_weak_view_from_the_student_and_the_bank_from_the_teacher():
    class Teacher(nn.Module):  # another projection than the student's: tells whose features went where
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": -x[:, :5], "proj": torch.nn.functional.normalize(-x[:, 5:].flip(1), dim=1)}

    g = torch.Generator().manual_seed(2)
    x_lb, y = torch.randn(8, 9, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    x_w, x_s = torch.randn(8, 9, generator=g), torch.randn(8, 9, generator=g)
    ctx = StepContext(step=5, total_steps=10, teacher=Teacher())
    for compat in (True, False):
        alg = make("simmatch", p_cutoff=0.0, T=0.5, da_len=1, usb_compat=compat)
        out = alg.step(LogitsAndProj(), StepBatch(x_lb, y, torch.arange(8), [x_w], [x_s]), ctx)
        assert torch.allclose(alg.bank.feats, Teacher()(x_lb)["proj"], atol=1e-6)  # assigned directly, unit norm
        weak = (LogitsAndProj() if compat else Teacher())(x_w)["logits"].softmax(-1)
        aligned = weak * 0.2 / weak.mean(0)  # da_len 1: this batch's mean; the bank was not full yet
        aligned = aligned / aligned.sum(1, keepdim=True)
        want = -(aligned * torch.log_softmax(x_s[:, :5], -1)).sum(1).mean()
        assert float(out.logs["unsup_loss"]) == pytest.approx(float(want), rel=1e-4)
    no_teacher = make("simmatch", usb_compat=True)
    before = no_teacher.bank.feats.clone()
    no_teacher.step(LogitsAndProj(), StepBatch(x_lb, y, torch.arange(8), [x_w], [x_s]), CTX)  # USB's small-data path
    f = torch.nn.functional.normalize(x_lb[:, 5:], dim=1)
    assert torch.allclose(no_teacher.bank.feats, torch.nn.functional.normalize(0.7 * before + 0.3 * f, dim=0))
