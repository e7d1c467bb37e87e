"""The checkpoint has one owner (sslfw/ckpt.py): every piece of state round-trips through it, readers go through it,
and a checkpoint written by the layout before the owner existed still resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sslfw import ckpt
from sslfw.algorithms.base import DataInfo
from sslfw.data.reader import ShardSet
from sslfw.dist import make_accelerator
from sslfw.runconfig import load_config
from sslfw.session import open_streams
from sslfw.step import build_run, make_batch, train_step
from sslfw.train import train
from tests.helpers import tiny_overrides

# Written by commit 3d51033 (before the checkpoint had one owner) with tests/fixtures/make_old_checkpoint.py: step 2
# of a 4-step CoMatch run on the session's small shards.
OLD = Path(__file__).parent / "fixtures" / "ckpt_3d51033" / "step-2"
TOL = 1e-5  # float tolerance against a fixture written on another CPU (see the test)
OLD_RUN = {"algorithm.name": "comatch", "algorithm.params": "{queue_size: 16}", "train.steps": 4, "ckpt.every": 2}


def _equal(a, b, atol: float = 0.0) -> bool:
    """Nested state (dicts, lists, tensors, numbers) equal element for element; float tensors within `atol`."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return torch.allclose(a, b, rtol=0, atol=atol) if atol and a.is_floating_point() else torch.equal(a, b)
    return a == b


def test_the_checkpointer_round_trips_every_piece_of_state(small_shards, tmp_path):
    over = tiny_overrides(small_shards, tmp_path / "run", **{"algorithm.name": "comatch",
                                                             "algorithm.params": "{queue_size: 16}"})  # fmt: skip
    cfg = load_config(None, over)
    acc = make_accelerator("no")
    lb_set, pool = ShardSet(small_shards, "train"), ShardSet(small_shards, "unlabelled")
    data = DataInfo(len(lb_set), len(pool), cfg.model.proj_dim)
    run = build_run(cfg, acc, data)
    streams = open_streams(cfg, lb_set, 8, 0, 0, False, True)
    for step in range(3):  # moves the weights, the optimizer moments, the EMA teacher and CoMatch's queue
        batch = make_batch(run, streams.next_labelled(), streams.next_unlabelled(), torch.Generator().manual_seed(step))
        train_step(run, step, [batch])
    run.checkpointer.save(3, skipped=1, val={"val/ema/srcc": 0.5})
    saved = ckpt.read(tmp_path / "run", "--checkpoint")  # the run folder: its newest intact checkpoint
    assert saved.path.name == "step-3" and saved.step == 3 and saved.skipped_steps == 1
    info = saved.info
    assert info["world_size"] == 1 and info["stream_position"] == 3 and info["seed"] == cfg.train.seed
    assert (
        info["val_score"] == {"key": "val/ema/srcc", "value": 0.5} and info["config"]["algorithm"]["name"] == "comatch"
    )
    again = build_run(cfg, acc, data, saved.state)
    for name, part in run.checkpointer.parts.items():
        assert _equal(part.state_dict(), again.checkpointer.parts[name].state_dict()), name
    assert any(v.abs().sum() > 0 for v in again.algorithm.state_dict().values())  # the queue was really filled
    assert _equal(saved.weights("student"), run.raw_model.state_dict())
    assert _equal(saved.weights("ema"), run.ema.module.state_dict())


def test_a_checkpoint_from_before_the_owner_resumes_to_the_uninterrupted_weights(small_shards, tmp_path):
    """On the CPU that wrote the fixture the resumed state equals the uninterrupted one bit for bit; another CPU
    rounds the first two steps differently (8.7e-7 at most on the 2026-12-03 dev box), so floats are compared to
    TOL, while the two resumed steps move the weights by over 50x that: a part the old layout failed to restore
    (optimizer moments, EMA teacher, CoMatch's queue) would show. Counts and indices stay exact."""
    whole = train(load_config(None, tiny_overrides(small_shards, tmp_path / "whole", **OLD_RUN)))
    old = tmp_path / "old" / "step-2"
    shutil.copytree(OLD, old)
    assert json.loads((old / ckpt.INFO).read_text())["step"] == 2
    resumed = train(
        load_config(None, tiny_overrides(small_shards, tmp_path / "resumed", **OLD_RUN, **{"ckpt.resume": old}))
    )
    assert whole["step"] == resumed["step"] == 4
    a = ckpt.read(tmp_path / "whole", "--checkpoint")
    b = ckpt.read(tmp_path / "resumed", "--checkpoint")
    for part in ("model", "optimizer", "algorithm", "ema"):
        assert _equal(a.state[part], b.state[part], atol=TOL), part
    start = ckpt.read(old, "--checkpoint").state["model"]
    assert max((a.state["model"][k] - start[k]).abs().max() for k in start) > 50 * TOL  # the steps after the resume
