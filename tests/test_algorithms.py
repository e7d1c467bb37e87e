"""SSL algorithms: hand-computed masks, targets and losses; world-size invariance with real gloo processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sslfw.algorithms import get_algorithm
from sslfw.algorithms.base import StepBatch, StepContext
from sslfw.config import AlgorithmConfig
from tests.conftest import ROOT


class LogitsAreInputs(nn.Module):
    """A model whose output logits are its input: lets a test choose the logits of every view exactly."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x, "feat": x}


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def make(name: str, **params):
    return get_algorithm(name)(AlgorithmConfig(name=name, params=params), num_labelled=8)


CTX = StepContext(step=5, total_steps=10, teacher=None, num_labelled=8)


def test_fixmatch_mask_targets_and_loss():
    alg = make("fixmatch", p_cutoff=0.9)
    z_lb = logits([4.0, 0, 0, 0, 0])
    z_w = logits([5.0, 0, 0, 0, 0], [1.0, 0.5, 0, 0, 0])  # confident (p=0.974) / not
    z_s = logits([1.0, 2.0, 0, 0, 0], [0.0, 0, 3.0, 0, 0])
    out = alg.step(LogitsAreInputs(), StepBatch(z_lb, torch.tensor([0]), torch.tensor([0]), z_w, [z_s]), CTX)
    sup = -math.log(math.exp(4) / (math.exp(4) + 4))
    ce0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(2) + 3))
    assert out.logs["mask_ratio"] == pytest.approx(0.5)
    assert float(out.logs["unsup_loss"]) == pytest.approx(ce0 / 2)  # mean over the whole batch, masked row only
    assert float(out.loss) == pytest.approx(sup + ce0 / 2, rel=1e-5)
    soft = make("fixmatch", p_cutoff=0.9, hard_label=False, T=0.5)
    compat = make("fixmatch", p_cutoff=0.9, hard_label=False, usb_compat=True)
    batch = StepBatch(z_lb, torch.tensor([0]), torch.tensor([0]), z_w, [z_s])
    t = torch.softmax(z_w[0] / 0.5, -1)
    want = -(t * torch.log_softmax(z_s[0], -1)).sum().item() / 2
    assert float(soft.step(LogitsAreInputs(), batch, CTX).logs["unsup_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(compat.step(LogitsAreInputs(), batch, CTX).logs["unsup_loss"]) != pytest.approx(want, rel=1e-3)


def test_adamatch_alignment_relative_threshold_and_warmup():
    alg = make("adamatch", p_cutoff=0.9, ema_p=0.5)
    z_lb = logits([3.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0])
    z_w = logits([2.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0])
    batch = StepBatch(z_lb, torch.tensor([0, 2]), torch.tensor([0, 1]), z_w, [z_w.clone()])
    out = alg.step(LogitsAreInputs(), batch, CTX)
    p_lb, p_w = z_lb.softmax(-1), z_w.softmax(-1)
    assert torch.allclose(alg.p_model, p_w.mean(0))  # first call: the batch mean
    assert torch.allclose(alg.p_target, 0.5 * torch.full((5,), 0.2) + 0.5 * p_lb.mean(0))
    assert float(out.logs["threshold"]) == pytest.approx(0.9 * p_lb.max(-1).values.mean().item(), rel=1e-6)
    assert alg.unsup_weight(StepContext(0, 10, None, 8)) == pytest.approx(0.0)
    assert alg.unsup_weight(StepContext(5, 10, None, 8)) == pytest.approx(1.0)
    assert make("adamatch", usb_compat=True).unsup_weight(StepContext(0, 10, None, 8)) == 1.0


def test_freematch_state_updates_mask_and_fairness_sign():
    alg = make("freematch", ema_p=0.5)
    z_w = logits([6.0, 0, 0, 0, 0], [0, 0, 0.2, 0, 0])
    batch = StepBatch(logits([1.0, 0, 0, 0, 0]), torch.tensor([0]), torch.tensor([0]), z_w, [logits([2.0, 0, 0, 0, 0],
                                                                                                   [0, 0, 2.0, 0, 0])])
    out = alg.step(LogitsAreInputs(), batch, CTX)
    p_w = z_w.softmax(-1)
    conf = p_w.max(-1).values
    assert float(alg.time_p) == pytest.approx(0.5 * 0.2 + 0.5 * conf.mean().item(), rel=1e-6)
    assert torch.allclose(alg.p_model, 0.5 * 0.2 + 0.5 * p_w.mean(0))
    assert torch.allclose(alg.label_hist, 0.5 * 0.2 + 0.5 * torch.tensor([0.5, 0, 0.5, 0, 0]))
    thresh = alg.time_p * alg.p_model[p_w.argmax(-1)] / alg.p_model.max()
    assert out.logs["mask_ratio"] == pytest.approx((conf >= thresh).float().mean().item())
    assert float(out.logs["fair_loss"]) <= 0  # minus a cross-entropy


@pytest.mark.parametrize("name", ["fixmatch", "adamatch", "freematch"])
def test_two_ranks_equal_one_rank_with_the_global_batch(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "tests" / "dist" / "algo_invariance.py"), name, str(out), "4"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    one, (r0, r1) = results[1][0], results[2]
    for a, b, c in zip(one, r0, r1):
        assert b["hash"] == c["hash"]  # state identical on both ranks
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(b["grads"], a["grads"], rtol=1e-4, atol=1e-6)
        for k in a["state"]:
            np.testing.assert_allclose(b["state"][k], a["state"][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["supervised", "fixmatch", "adamatch", "freematch"])
def test_trains_checkpoints_and_resumes_to_identical_state(name, small_shards, tmp_path, monkeypatch):
    from sslfw import ckpt
    from sslfw.config import load_config
    from sslfw.train import EXIT_PREEMPTED, train
    from tests.conftest import tiny_overrides

    extra = {"algorithm.name": name, "train.steps": 6, "ckpt.every": 6, "eval.every": 0, "aug.strong": "randaugment"}
    whole = train(load_config(None, tiny_overrides(small_shards, tmp_path / "whole", **extra)))
    monkeypatch.setenv("SSLFW_FAULT_SIGNAL", "0:3")
    stopped = train(load_config(None, tiny_overrides(small_shards, tmp_path / "cut", **extra)))
    monkeypatch.delenv("SSLFW_FAULT_SIGNAL")
    resumed = train(load_config(None, tiny_overrides(small_shards, tmp_path / "cut", **extra)))
    assert whole["exit_code"] == 0 and stopped["exit_code"] == EXIT_PREEMPTED and stopped["step"] == 3
    assert resumed["exit_code"] == 0 and resumed["step"] == 6
    a, b = (ckpt.load(ckpt.latest(tmp_path / d))[0] for d in ("whole", "cut"))
    for part in ("model", "algorithm"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]) for k in a["ema"]["module"])
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
