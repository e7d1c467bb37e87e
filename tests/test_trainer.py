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
from torch.utils._python_dispatch import TorchDispatchMode

from sslfw import ckpt, trace
from sslfw.algorithms.base import DataInfo
from sslfw.preempt import EXIT_NONFINITE, EXIT_PREEMPTED
from sslfw.runconfig import load_config
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
def test_kill_and_resume_gives_identical_weights_and_losses(small_shards, tmp_path, capsys, one_thread):
    """Only the killed run needs a process of its own; the others train here, with the child's one thread."""
    train(load_config(None, tiny_overrides(small_shards, tmp_path / "whole", **{"data.num_workers": 1})))
    killed = tmp_path / "killed"
    args = ["train", *tiny_overrides(small_shards, killed, **{"data.num_workers": 1})]
    proc = run_sslfw(args, env={"SSLFW_FAULT_KILL": "0:15"})  # SIGKILL after step 15; last checkpoint: 10
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in ckpt.valid_checkpoints(killed)] == [10]
    assert max(s for s, _ in losses(killed)) == 15  # steps 11..15 were trained and lost
    capsys.readouterr()
    assert train(load_config(None, args[1:] + ["--ckpt.resume=auto"]))["step"] == 20
    assert "steps 10->20" in capsys.readouterr().out
    whole, again = final_model(tmp_path / "whole"), final_model(killed)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert losses(killed) == losses(tmp_path / "whole")


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_two_processes_train_and_evaluate_each_sample_once(small_shards, tmp_path):
    run = tmp_path / "ddp"  # FixMatch: the weak view's no-grad forward through DDP, and one trace per rank
    extra = {
        "data.num_workers": 2,
        "log.wandb": "offline",
        "algorithm.name": "fixmatch",
        "algorithm.params": "{p_cutoff: 0.5}",
    }
    proc = run_sslfw(["train", *tiny_overrides(small_shards, run, **extra)], nproc=2, launcher="accelerate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "= 2 ranks x 4 x 1 accumulation" in proc.stdout
    index = json.loads((small_shards / "index.json").read_text())
    evals = [r for r in rows(run) if "val/student/n" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["val/student/n"] == r["val/ema/n"] == index["sets"]["val"]["count"] for r in evals)
    assert all(r["val/student/const_mae"] >= 0 and "val/student/srcc" in r for r in evals)
    assert list((run / "wandb").glob("offline-run-*"))  # W&B offline files for `wandb sync`
    chunks = sorted(f.name for f in (run / "pseudo_trace").iterdir())
    assert chunks == [f"r{r}-upto-{s:07d}.npz" for r in (0, 1) for s in (10, 20)]
    t = trace.load(run, ckpt.info(ckpt.latest(run))["data"])
    assert len(t["step"]) == 20 * 2 * 4 and sorted(set(t["step"].tolist())) == list(range(1, 21))  # 4 per rank


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


def test_weak_view_without_autograd_gives_the_same_losses_and_batchnorm_models_keep_one_forward(small_shards, tmp_path):
    extra = {"algorithm.name": "fixmatch", "algorithm.params": "{p_cutoff: 0.5}", "aug.strong": "randaugment"}
    for flag in ("true", "false"):
        train(load_config(None, tiny_overrides(small_shards, tmp_path / flag, **extra, **{"train.weak_no_grad": flag})))
    split, joint = losses(tmp_path / "true"), losses(tmp_path / "false")
    assert len(split) == 20 and [s for s, _ in split] == [s for s, _ in joint]
    for (_, a), (_, b) in zip(split, joint):  # equal up to float rounding: the matmuls see other batch shapes
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    masks = [[r["train/mask_ratio"] for r in rows(tmp_path / d) if "train/mask_ratio" in r] for d in ("true", "false")]
    assert masks[0] == masks[1] and any(m > 0 for m in masks[0])  # the same pseudo-labels passed, and some did
    from sslfw.dist import make_accelerator
    from sslfw.step import build_run

    for name, kwargs, split_expected in (("resnet10t", "{}", False), ("vit_tiny_patch16_224", None, True)):
        over = {"model.name": name} | ({"model.kwargs": kwargs} if kwargs else {})
        cfg = load_config(None, tiny_overrides(small_shards, tmp_path / name, **extra, **over))
        run = build_run(cfg, make_accelerator("no"), DataInfo(8, 8, cfg.model.proj_dim))
        assert run.split_weak is split_expected  # BatchNorm: batch statistics would differ between the forwards


DISPATCH_FRAMES = ("torch/_dynamo/eval_frame.py", "torch/_compile.py", "torch/utils/_python_dispatch.py")


class HostReads(TorchDispatchMode):
    """CPU proxy for CUDA's sync debug mode: records where sslfw code reads a tensor's value back to the host
    (.item(), bool(), float(), int() reach the dispatcher as _local_scalar_dense; .tolist() does not, so it is
    wrapped). Reads inside torch itself are left out: the optimizer's step counters live on the host even when
    training on a GPU, so they are no device syncs there."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []
        self._tolist = torch.Tensor.tolist

    def _record(self, depth: int) -> None:
        frame = sys._getframe(depth)
        while frame.f_code.co_filename == __file__ or any(m in frame.f_code.co_filename for m in DISPATCH_FRAMES):
            frame = frame.f_back
        if "/torch/" not in frame.f_code.co_filename:  # the innermost Python frame asking for the value
            self.where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")

    def __enter__(self):
        def tolist(t):
            self._record(1)
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record(1)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["supervised", "fixmatch", "adamatch", "freematch", "comatch", "simmatch", "crmatch"])
def test_a_training_step_reads_back_to_the_host_once(name, small_shards, tmp_path):
    from sslfw.data.reader import ShardSet
    from sslfw.dist import make_accelerator
    from sslfw.session import open_streams
    from sslfw.step import build_run, make_batch, train_step

    params = {"comatch": "{queue_size: 16}"}.get(name, "{}")
    cfg = load_config(
        None, tiny_overrides(small_shards, tmp_path, **{"algorithm.name": name, "algorithm.params": params})
    )
    lb_set, pool = ShardSet(small_shards, "train"), ShardSet(small_shards, "unlabelled")
    run = build_run(cfg, make_accelerator("no"), DataInfo(len(lb_set), len(pool), cfg.model.proj_dim))
    streams = open_streams(cfg, lb_set, 8, 0, 0, False, run.algorithm.uses_unlabelled)
    filling, settled = ["bank.py:_is_full", "dist.py:any_across_ranks"], 0
    for step in range(len(lb_set) // 2):  # SimMatch's bank (the labelled set) and CoMatch's queue fill well before
        lb, ulb = streams.next_labelled(), streams.next_unlabelled()  # the loader's own reads are not the step's
        with HostReads() as reads:
            batch = make_batch(run, lb, ulb, torch.Generator().manual_seed(step))
            train_step(run, step, [batch])
        if settled or reads.where != filling:  # a memory asks whether it is full until it is, then never again
            assert reads.where == ["dist.py:any_across_ranks"], (step, reads.where)  # the skip/stop agreement
            settled += 1
        if settled == 3:
            break
    assert settled == 3, "the memories never filled"


def test_fused_optimizer_trains_like_the_default_path(small_shards, tmp_path):
    for flag in ("true", "false"):
        train(load_config(None, tiny_overrides(small_shards, tmp_path / flag, **{"optim.fused": flag})))
    fused, plain = losses(tmp_path / "true"), losses(tmp_path / "false")
    assert len(fused) == 20 and fused[0] == plain[0]  # the first loss precedes any update
    for (_, a), (_, b) in zip(fused, plain):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    a, b = final_model(tmp_path / "true"), final_model(tmp_path / "false")
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5) for k in a)


def test_jpeg_decoded_on_the_device_trains_and_evaluates_like_the_workers(small_shards, tmp_path):
    """KonIQ-like JPEG labels decoded by `images_on` (the PNG pool stays in the workers): the same pixels, so the
    same losses and val metrics, bit for bit on a CPU."""
    extra = {"algorithm.name": "fixmatch", "train.steps": 6, "eval.every": 6, "ckpt.every": 6, "data.num_workers": 1}
    results = {}
    for flag in ("true", "false"):
        results[flag] = train(
            load_config(None, tiny_overrides(small_shards, tmp_path / flag, **extra, **{"data.jpeg_on_device": flag}))
        )
    assert len(losses(tmp_path / "true")) == 6 and losses(tmp_path / "true") == losses(tmp_path / "false")
    a, b = (json.dumps(results[f]["val"], sort_keys=True) for f in ("true", "false"))  # NaN-safe equality
    assert a == b and "val/ema/srcc" in results["true"]["val"]


@pytest.mark.slow  # torch.compile takes about a minute on 2 cores
def test_compiled_model_trains_like_the_eager_one(small_shards, tmp_path):
    extra = {"algorithm.name": "fixmatch", "train.steps": 4, "eval.every": 0, "ckpt.every": 4}
    for flag in ("true", "false"):
        train(load_config(None, tiny_overrides(small_shards, tmp_path / flag, **extra, **{"train.compile": flag})))
    compiled, eager = losses(tmp_path / "true"), losses(tmp_path / "false")
    assert len(compiled) == 4
    for (_, a), (_, b) in zip(compiled, eager):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    a, b = final_model(tmp_path / "true"), final_model(tmp_path / "false")
    assert a.keys() == b.keys()  # compiled in place: checkpoints keep the eager names
    # Fused kernels round differently; AdamW turns a near-zero gradient of either sign into a step of up to lr, so
    # after 4 steps weights may differ by a few lr (5e-4), not more.
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 4 * 5e-4


@pytest.mark.slow  # five fresh processes
def test_the_launchers_precision_wins_unless_the_config_sets_one(monkeypatch, capsys):
    """accelerate launch --mixed_precision X arrives as ACCELERATE_MIXED_PRECISION; train.precision: auto takes it, a
    value in the config wins over it. fp16 needs a GPU (accelerate has no CPU fp16 autocast or scaler): on a CPU it
    says so and runs, and records, fp32 (launch/bench_gpu.sh trains in fp16 on a GPU). Accelerate keeps one
    precision per process, so its state is reset around each case, as a fresh process would start."""
    from accelerate.state import AcceleratorState

    from sslfw.dist import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for env, precision, want in [("bf16", "auto", "bf16"), ("fp16", "auto", "no"), ("bf16", "no", "no"),
                                 ("", "auto", "no"), ("no", "bf16", "bf16"), ("no", "fp16", "no")]:  # fmt: skip
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            assert make_accelerator(precision).mixed_precision == want, (env, precision)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        told = "fp16 needs a GPU" in capsys.readouterr().err
        assert told == ("fp16" in (env, precision) and want == "no"), (env, precision)


def test_sslfw_eval_logs_into_the_wandb_run_it_evaluated(small_shards, tmp_path, capsys):
    """Offline W&B files: `sslfw eval` adds its metrics and confusion matrix to the run id that trained the
    checkpoint (resumed), so they sit beside its training curves."""
    from sslfw.cli import main

    run = tmp_path / "run"
    over = {"log.wandb": "offline", "train.steps": 4, "eval.every": 2, "ckpt.every": 4}
    train(load_config(None, tiny_overrides(small_shards, run, **over)))
    runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    trained = runs[0].read_bytes()
    assert b"val/ema/srcc" in trained and b"eval/val" not in trained
    run_id = (run / "wandb_id").read_text().strip()
    assert main(["eval", "--checkpoint", str(run), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    after = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(after) == 2 and all(p.name == f"run-{run_id}.wandb" for p in after)  # the same run, resumed
    logged = (set(after) - set(runs)).pop().read_bytes()
    assert b"eval/val/ema/srcc" in logged and b"eval/val/ema/confusion" in logged


@pytest.mark.slow  # real processes: a rank killed under torchrun and under accelerate launch
def test_a_rank_that_dies_is_restarted_by_the_launcher_and_the_run_ends_as_if_it_had_not(small_shards, tmp_path):
    """torchrun --max-restarts 1 (and accelerate launch --max_restarts 1): SIGKILL of rank 1 at step 13 of 20
    (checkpoints every 5); the launcher restarts both ranks, they resume from step 10 on a fresh prefix of the
    agent's store (the old attempt's keys would name the dead ranks' addresses), and step 20 equals an
    uninterrupted run's weights tensor for tensor. The fault fires once (SSLFW_FAULT_ONCE), not at the replay."""
    over = {"ckpt.every": 5, "eval.every": 0, "data.num_workers": 0}
    whole = run_sslfw(["train", *tiny_overrides(small_shards, tmp_path / "whole", **over)], nproc=2)
    assert whole.returncode == 0, whole.stderr[-2000:]
    for launcher in ("torchrun", "accelerate"):
        run, fired = tmp_path / launcher, tmp_path / f"{launcher}.fired"
        env = {"SSLFW_FAULT_KILL": "1:12", "SSLFW_FAULT_ONCE": str(fired)}
        proc = run_sslfw(["train", *tiny_overrides(small_shards, run, **over)], nproc=2, env=env,
                         launcher=launcher, restarts=1)  # fmt: skip
        assert proc.returncode == 0, (launcher, proc.stderr[-3000:])
        assert fired.is_file() and "steps 10->20" in proc.stdout, (launcher, proc.stdout[-2000:])
        a, b = final_model(tmp_path / "whole"), final_model(run)
        assert all(torch.equal(a[k], b[k]) for k in a), launcher
