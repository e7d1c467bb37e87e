"""The training loop: read it top to bottom.

    sslfw train --config configs/embedded_supervised.yaml                       # one process (CPU or one GPU)
    accelerate launch --num_processes 4 -m sslfw train --config FILE.yaml        # 4 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m sslfw train --config FILE.yaml

Semantics worth knowing:
- train.batch_size is the GLOBAL labelled batch of one optimizer step; each rank gets batch/(world*grad_accum).
- Steps, not epochs. Batch `s` of each stream is a function of (seed, rank, s) and the per-step RNG (augmentation,
  drop path) is reseeded from (seed, rank, step), so a resumed run repeats the uninterrupted run exactly.
- A non-finite loss on any rank skips the step on every rank (it is counted); max_nonfinite in a row stops the run.
- SIGUSR1/SIGTERM only set a flag; ranks agree at the next step boundary, save a checkpoint and exit with
  EXIT_PREEMPTED (and write run_dir/preempted.json, since launchers such as torchrun do not pass worker exit codes
  on), so the caller (slurm/*.sbatch) can requeue and `--ckpt.resume auto` picks it up (sslfw/preempt.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

from sslfw import ckpt, rundir
from sslfw.config import Config, to_dict
from sslfw.dist import make_accelerator
from sslfw.logger import progress_bar
from sslfw.preempt import EXIT_NONFINITE, StopFlag
from sslfw.session import PREEMPTED, open_session
from sslfw.step import per_rank_batch, train_step

__all__ = ["PREEMPTED", "train"]


def train(cfg: Config) -> dict:
    """Train `cfg` to `train.steps` (resuming as `ckpt.resume` says); {"exit_code", "step", "skipped_steps", "val",
    "run_dir"}."""
    acc = make_accelerator(cfg.train.precision)
    per_rank = per_rank_batch(cfg, acc.num_processes)
    # The run folder first: whose it is, what to resume from, and a lock held for the whole run.
    resume_from, lock, created = rundir.claim(cfg.run_dir, cfg.ckpt, to_dict(cfg), acc.is_main_process, acc.device)
    try:
        return _train_claimed(cfg, acc, per_rank, resume_from, created)
    finally:
        if lock is not None:  # however the run ends (an error included), the folder is free again
            lock.release()


def _due(step: int, every: int, last: int) -> bool:
    return bool(every and step % every == 0) or step == last


def _train_claimed(cfg: Config, acc: Accelerator, per_rank: int, resume_from: Path | None, created: bool) -> dict:
    try:
        saved = ckpt.Saved(resume_from, *ckpt.load(resume_from)) if resume_from else None
    except Exception:
        if acc.is_main_process and created:  # a start refused by its inputs leaves no folder behind
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        raise
    if saved and saved.step >= cfg.train.steps:
        if acc.is_main_process:
            print(f"[sslfw] {resume_from} is at step {saved.step} >= train.steps={cfg.train.steps}: nothing to "
                  f"train. Raise --train.steps to continue this run.", flush=True)  # fmt: skip
            if created:
                shutil.rmtree(cfg.run_dir, ignore_errors=True)
        return {"exit_code": 0, "step": saved.step, "skipped_steps": saved.skipped_steps, "val": {},
                "run_dir": str(cfg.run_dir)}  # fmt: skip
    s = open_session(cfg, acc, per_rank, saved, created)
    run, steps = s.run, cfg.train.steps
    s.announce(per_rank)
    stop = StopFlag()  # SIGUSR1/SIGTERM only set it; ranks agree on it inside train_step
    bar = progress_bar(
        total=steps, initial=s.start, show=acc.is_main_process and cfg.log.progress, unit="step", dynamic_ncols=True
    )
    step, exit_code, val = s.start, 0, {}
    run.model.train()
    while step < steps:
        res = train_step(run, step, s.batches(step), lambda: stop.signal is not None)
        if s.nonfinite.stop_after(step, res.applied):
            exit_code = EXIT_NONFINITE
            break
        step += 1
        bar.update()
        s.record_pseudo(step, res)
        if _due(step, cfg.train.log_every, steps):
            bar.set_postfix(loss=f"{s.log_train(step, res):.4f}")
        val_now = s.evaluate(step) if _due(step, cfg.eval.every, steps) else None
        val = val_now or val
        if res.stop:
            exit_code = s.stop(step, stop, val_now)
            break
        if _due(step, cfg.ckpt.every, steps):
            s.save(step, val_now)
    bar.close()
    stop.restore()
    return s.close(step, exit_code, val)
