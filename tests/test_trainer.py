"""The training loop on real shards: determinism, kill + resume, 2-process DDP, NaN agreement, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslfw import ckpt
from sslfw.config import load_config
from sslfw.preempt import EXIT_NONFINITE, EXIT_PREEMPTED
from sslfw.train import PREEMPTED, train
from tests.helpers import child_env, run_sslfw, tiny_overrides, torchrun


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in rows(run_dir) if "train/loss" in r]


def final_model(run_dir: Path) -> dict:
    return ckpt.load(ckpt.latest(run_dir))[0]["model"]


def test_same_seed_gives_identical_losses(small_shards, tmp_path):
    a = train(load_config(None, tiny_overrides(small_shards, tmp_path / "a")))
    train(load_config(None, tiny_overrides(small_shards, tmp_path / "b")))
    train(load_config(None, tiny_overrides(small_shards, tmp_path / "c", **{"train.seed": 1})))
    assert a["exit_code"] == 0 and a["step"] == 20
    la, lb, lc = losses(tmp_path / "a"), losses(tmp_path / "b"), losses(tmp_path / "c")
    assert len(la) == 20 and la == lb
    assert la != lc
    saved = load_config(tmp_path / "a" / "config.yaml")  # the resolved config is saved and loads back
    assert saved.train.steps == 20 and saved.model.kwargs["embed_dim"] == 32


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_kill_and_resume_gives_identical_weights_and_losses(small_shards, tmp_path):
    args = ["train", *tiny_overrides(small_shards, tmp_path / "whole", **{"data.num_workers": 1})]
    assert run_sslfw(args).returncode == 0
    killed = tmp_path / "killed"
    args = ["train", *tiny_overrides(small_shards, killed, **{"data.num_workers": 1})]
    proc = run_sslfw(args, env={"SSLFW_FAULT_KILL": "0:15"})  # SIGKILL after step 15; last checkpoint: 10
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in ckpt.valid_checkpoints(killed)] == [10]
    assert max(s for s, _ in losses(killed)) == 15  # steps 11..15 were trained and lost
    resumed = run_sslfw(args + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps 10->20" in resumed.stdout
    whole, again = final_model(tmp_path / "whole"), final_model(killed)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert losses(killed) == losses(tmp_path / "whole")


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_two_processes_train_and_evaluate_each_sample_once(small_shards, tmp_path):
    run = tmp_path / "ddp"
    proc = run_sslfw(
        ["train", *tiny_overrides(small_shards, run, **{"data.num_workers": 2, "log.wandb": "offline"})],
        nproc=2,
        launcher="accelerate",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "= 2 ranks x 4 x 1 accumulation" in proc.stdout
    index = json.loads((small_shards / "index.json").read_text())
    evals = [r for r in rows(run) if "val/student/n" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["val/student/n"] == r["val/ema/n"] == index["sets"]["val"]["count"] for r in evals)
    assert all(r["val/student/const_mae"] >= 0 and "val/student/srcc" in r for r in evals)
    assert list((run / "wandb").glob("offline-run-*"))  # W&B offline files for `wandb sync`


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_nan_on_one_rank_is_skipped_on_both_and_repeated_nans_stop(small_shards, tmp_path):
    run = tmp_path / "nan"
    fault = "1:5,1:12,1:13,1:14"  # rank 1 only: once at step 5, then three in a row
    proc = run_sslfw(
        ["train", *tiny_overrides(small_shards, run, **{"train.max_nonfinite": 3})],
        nproc=2,
        env={"SSLFW_FAULT_NAN": fault},
    )
    assert f"exitcode  : {EXIT_NONFINITE}" in proc.stderr or f"exitcode: {EXIT_NONFINITE}" in proc.stderr, proc.stderr[
        -3000:
    ]
    assert "step 5: non-finite loss on some rank; step skipped (1 in a row, 1 total)" in proc.stdout
    assert "stopping: 3 non-finite steps in a row" in proc.stderr
    skipped = {r["step"]: r["train/skipped_steps"] for r in rows(run) if "train/skipped_steps" in r}
    assert skipped[4] == 0 and skipped[6] == 1 and skipped[11] == 1
    model = final_model(run)  # the step-10 checkpoint: parameters stayed finite
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_sigusr1_saves_one_checkpoint_and_exits_with_the_documented_code(small_shards, tmp_path):
    run = tmp_path / "sig"
    args = tiny_overrides(small_shards, run, **{"train.steps": 100000, "ckpt.every": 100000, "eval.every": 0})
    env = child_env(PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    cmd = torchrun(2, "-m", "sslfw", "train", *args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, as Slurm does; it forwards to the workers
    out, err = proc.communicate(timeout=120)
    found = ckpt.valid_checkpoints(run)
    assert len(found) == 1, (out, err[-3000:])
    step = found[0][0]
    assert 5 <= step < 100000
    assert f"saved step-{step}, exiting with {EXIT_PREEMPTED}" in out
    assert json.loads((run / PREEMPTED).read_text()) == {"step": step, "signal": "SIGUSR1"}
    assert json.loads((found[0][1] / "trainer_state.json").read_text())["step"] == step


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_single_process_exit_code_on_sigterm(small_shards, tmp_path):
    run = tmp_path / "term"
    args = [
        "train",
        *tiny_overrides(small_shards, run, **{"train.steps": 100000, "ckpt.every": 100000, "eval.every": 0}),
    ]
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sslfw", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED
    assert len(ckpt.valid_checkpoints(run)) == 1
