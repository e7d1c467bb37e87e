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
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from sslfw import ckpt, faults, fsio, rundir
from sslfw.algorithms import get_algorithm
from sslfw.algorithms.base import Algorithm, DataInfo, StepBatch, StepContext, Views
from sslfw.augment import Augmenter
from sslfw.config import Config, save_config, to_dict
from sslfw.data.jpeg import images_on, join_deferred
from sslfw.data.pseudo import load_pseudo_labels
from sslfw.data.reader import ShardSet
from sslfw.data.shards import load_index
from sslfw.data.stream import StreamId, TrainStream, make_loader
from sslfw.dist import any_across_ranks, autocast_for, barrier, make_accelerator, mean_across_ranks
from sslfw.ema import EMATeacher
from sslfw.errors import ConfigError, DataError
from sslfw.evaluate import eval_line, metrics_from_predictions, predict
from sslfw.logger import RunLogger, progress_bar
from sslfw.metrics import constant_guess
from sslfw.model import IQAModel
from sslfw.optim import build_optimizer, set_lr
from sslfw.preempt import EXIT_NONFINITE, StopFlag, record, write_exit_file
from sslfw.trace import PseudoTrace

PREEMPTED = "preempted.json"  # written with EXIT_PREEMPTED: {"step", "signal"}; removed when the run restarts


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def per_rank_batch(cfg: Config, world: int) -> int:
    """Labelled images per rank and micro-step: the global batch split over ranks and accumulation steps."""
    per_rank, rem = divmod(cfg.train.batch_size, world * cfg.train.grad_accum)
    if rem or per_rank == 0:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of world_size ({world}) x "
            f"train.grad_accum ({cfg.train.grad_accum})"
        )
    return per_rank


@dataclass
class Run:
    """Everything one optimizer step touches; built once by `build_run`, stepped by `train_step` (the trainer and
    `sslfw bench step` both)."""

    cfg: Config
    acc: Accelerator
    model: nn.Module  # what forward/backward go through (DDP-wrapped when distributed)
    raw_model: IQAModel  # the same parameters, unwrapped (checkpoints, EMA, evaluation)
    optimizer: torch.optim.Optimizer
    algorithm: Algorithm
    ema: EMATeacher | None
    augment: Augmenter
    views: Views  # unlabelled views per image the algorithm asked for
    autocast: Callable[[], AbstractContextManager]
    split_weak: bool  # the weak view may be forwarded without autograd (train.weak_no_grad, no BatchNorm)


def build_run(cfg: Config, acc: Accelerator, data: DataInfo, state: dict | None = None) -> Run:
    """Model, algorithm, optimizer and EMA on the device, from `state` (a checkpoint payload) when resuming."""
    algo_cls = get_algorithm(cfg.algorithm.name)
    torch.manual_seed(cfg.train.seed)  # the same init on every rank; DDP then keeps the replicas equal
    model = IQAModel(cfg.model, algo_cls.extra_heads, algo_cls.projection, algo_cls.score_head, data.edges)
    algorithm = algo_cls(cfg.algorithm, data).to(acc.device)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMATeacher(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        algorithm.load_state_dict(state["algorithm"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    if ema is not None:
        ema.module.to(acc.device)
    if cfg.train.compile:  # in place: state_dict keys stay the same, and the EMA deep copy above stays eager
        model.compile()
    model, optimizer = acc.prepare(model, optimizer)  # never the loaders: they are per-rank streams already
    return Run(
        cfg,
        acc,
        model,
        acc.unwrap_model(model),
        optimizer,
        algorithm,
        ema,
        Augmenter(cfg.aug, cfg.model.img_size),
        algo_cls.views(cfg.aug),
        autocast_for(acc, cfg.train.bf16),
        cfg.train.weak_no_grad and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
    )


def make_batch(run: Run, lb: dict, ulb: dict | None, gen: torch.Generator) -> StepBatch:
    """The algorithm's views of one loader batch (uint8 crops), augmented per sample on the device."""
    device = run.acc.device
    batch = StepBatch(
        run.augment.weak(images_on(lb, device, non_blocking=True), gen), lb["label"].to(device), lb["idx"].to(device)
    )
    if run.cfg.algorithm.sup_targets == "votes":
        batch.y_lb_soft = lb["target"].to(device)
    if "mos" in lb:  # a retraining batch joined with pseudo-labelled images carries levels only
        batch.mos_lb = lb["mos"].to(device)
    if ulb is not None:
        x_u = images_on(ulb, device, non_blocking=True)
        batch.x_ulb_w = [run.augment.weak(x_u, gen) for _ in range(run.views.weak)]
        batch.x_ulb_s = [run.augment.strong(x_u, gen) for _ in range(run.views.strong)]
        batch.idx_ulb, batch.keys_ulb = ulb["idx"].to(device), ulb["key"]
    return batch


@dataclass
class StepResult:
    applied: bool  # False: some rank had a non-finite loss, so every rank skipped the update
    stop: bool  # some rank was asked to stop (signal): save and exit at this boundary
    loss: torch.Tensor  # this rank's loss on the last micro-batch (detached)
    logs: dict[str, torch.Tensor | float]  # device tensors: read back only on the steps that log them
    lr: float
    pseudo: list[tuple[list[str], torch.Tensor, torch.Tensor]]  # (keys, level, used) per micro-batch, on device


def train_step(
    run: Run, step: int, batches: Iterable[StepBatch], stop_requested: Callable[[], bool] = lambda: False
) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches: forward + loss, backward, then (when every rank's loss
    was finite) clipping, the update at the scheduled lr, and the EMA update. Ends with the one collective every
    step needs: ranks agree on skip and stop."""
    cfg, acc = run.cfg, run.acc
    lr = set_lr(run.optimizer, step, cfg.train.steps, cfg.optim)
    ctx = StepContext(step, cfg.train.steps, run.ema.module if run.ema else None, run.split_weak)
    accum, finite, pseudo = cfg.train.grad_accum, torch.ones((), dtype=torch.bool, device=acc.device), []
    for micro, batch in enumerate(batches):
        # DDP all-reduces gradients only on the last micro-step.
        with acc.no_sync(run.model) if micro < accum - 1 else nullcontext(), run.autocast():
            out = run.algorithm.step(run.model, batch, ctx)
            loss = faults.inject(acc.process_index, step, out.loss / accum)
            acc.backward(loss)
        finite &= torch.isfinite(loss.detach()).all()  # stays on the device: no host sync per micro-step
        if out.pseudo is not None:
            pseudo.append((batch.keys_ulb, *out.pseudo))
    bad, stop = any_across_ranks([~finite, stop_requested()], acc.device)  # the step's one host sync
    if not bad:  # one rank's NaN already reached everyone's gradients through DDP: then skip on all ranks
        if cfg.optim.clip_grad > 0:
            acc.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not bad and run.ema is not None:
        run.ema.update(run.raw_model)
    return StepResult(not bad, stop, out.loss.detach(), dict(out.logs), lr, pseudo)


@dataclass
class Streams:
    """Per-rank infinite loaders; batch s of each is a pure function of (seed, stream, rank, s)."""

    labelled: Iterator[dict]
    unlabelled: Iterator[dict] | None
    pseudo: Iterator[dict] | None  # confident pseudo-labels drawn with the labelled batch (retraining)
    n_pseudo: int  # of the per-rank labelled batch
    damaged: int = 0  # images skipped on this rank because they no longer decode (replaced within their batch)

    def _next(self, it: Iterator[dict]) -> dict:
        batch = next(it)
        self.damaged += int(batch["damaged"])
        return batch

    def next_labelled(self) -> dict:
        lb = self._next(self.labelled)
        if self.pseudo is not None:
            pl = self._next(self.pseudo)
            joined = {k: torch.cat([lb[k], pl[k]]) for k in ("image", "label", "idx", "target")}
            lb = joined | {"key": lb["key"] + pl["key"]} | join_deferred(lb, pl)
        return lb

    def next_unlabelled(self) -> dict | None:
        return self._next(self.unlabelled) if self.unlabelled is not None else None


def open_streams(
    cfg: Config, lb_set: ShardSet, per_rank: int, rank: int, start: int, cuda: bool, uses_unlabelled: bool
) -> Streams:
    """The streams a run reads, positioned at optimizer step `start`."""
    crop, seed, pos = (cfg.data.load_crop, cfg.data.load_crop), cfg.train.seed, start * cfg.train.grad_accum

    def loader(shards: ShardSet, batch: int, stream: StreamId, **kw) -> Iterator[dict]:
        ts = TrainStream(shards, batch, crop, seed, rank, stream, pos, **kw)
        return iter(make_loader(ts, cfg.data.num_workers, pin_memory=cuda))

    pseudo, n_pl = None, 0
    if cfg.data.pseudo_labels:  # the paper's retraining: labelled and pseudo-labelled images drawn as one union
        if uses_unlabelled or per_rank < 2:
            raise ConfigError(
                "data.pseudo_labels: retraining on pseudo-labels is supervised, with at least 2 "
                "images per rank; set algorithm.name=supervised and a larger train.batch_size"
            )
        pool = ShardSet(cfg.data.shards, "unlabelled", cfg.data.jpeg_on_device)
        labels, keep = load_pseudo_labels(Path(cfg.data.pseudo_labels), pool, cfg.data.pseudo_min_confidence)
        share = cfg.data.pseudo_share or keep.sum() / (keep.sum() + len(lb_set))
        n_pl = min(per_rank - 1, max(1, round(per_rank * share)))
        pseudo = loader(pool, n_pl, StreamId.PSEUDO_LABELLED, keep=keep, labels=labels)
    unlabelled = None
    if uses_unlabelled:
        pool = ShardSet(cfg.data.shards, "unlabelled", cfg.data.jpeg_on_device)
        unlabelled = loader(pool, per_rank * cfg.algorithm.uratio, StreamId.UNLABELLED)
    return Streams(loader(lb_set, per_rank - n_pl, StreamId.LABELLED), unlabelled, pseudo, n_pl)


def train(cfg: Config) -> dict:
    """Train `cfg` to `train.steps` (resuming as `ckpt.resume` says); {"exit_code", "step", "skipped_steps", "val",
    "run_dir"}."""
    acc = make_accelerator(cfg.train.bf16)
    per_rank = per_rank_batch(cfg, acc.num_processes)
    # The run folder first: whose it is, what to resume from, and a lock held for the whole run.
    resume_from, lock, created = rundir.claim(cfg.run_dir, cfg.ckpt, to_dict(cfg), acc.is_main_process, acc.device)
    try:
        return _train_claimed(cfg, acc, per_rank, resume_from, created)
    finally:
        if lock is not None:  # however the run ends (an error included), the folder is free again
            lock.release()


def _train_claimed(cfg: Config, acc: Accelerator, per_rank: int, resume_from: Path | None, created: bool) -> dict:
    rank, world, device, main = acc.process_index, acc.num_processes, acc.device, acc.is_main_process
    run_dir, accum, seed = Path(cfg.run_dir), cfg.train.grad_accum, cfg.train.seed
    # Everything that reads inputs comes before the first write: a start its inputs refuse writes nothing (and
    # leaves no folder it created).
    try:
        state, info = ckpt.load(resume_from) if resume_from else ({}, {})
        start = int(info.get("step", 0))
        if start >= cfg.train.steps:
            if main:
                print(
                    f"[sslfw] {resume_from} is at step {start} >= train.steps={cfg.train.steps}: nothing to train. "
                    f"Raise --train.steps to continue this run.",
                    flush=True,
                )
                if created:
                    shutil.rmtree(run_dir, ignore_errors=True)
            return {"exit_code": 0, "step": start, "skipped_steps": int(info.get("skipped_steps", 0)), "val": {},
                    "run_dir": str(run_dir)}  # fmt: skip
        index = load_index(Path(cfg.data.shards))
        jpeg = cfg.data.jpeg_on_device
        lb_set, eval_set = ShardSet(cfg.data.shards, "train", jpeg), ShardSet(cfg.data.shards, cfg.eval.split, jpeg)
        if len(eval_set) == 0:
            raise DataError(f"{cfg.data.shards}: eval.split {cfg.eval.split!r} has no samples; choose another split")
        data = DataInfo(
            len(lb_set),
            index["sets"].get("unlabelled", {}).get("count", 0),
            cfg.model.proj_dim,
            tuple(index["label_scheme"]["edges"]),
        )
        run = build_run(cfg, acc, data, state)
        streams = open_streams(cfg, lb_set, per_rank, rank, start, device.type == "cuda", run.algorithm.uses_unlabelled)
    except Exception:
        if main and created:  # a start refused by its inputs leaves no folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    constant = constant_guess(index["sets"]["train"]["class_counts"])
    if main:
        save_config(cfg, run_dir / "config.yaml")
        rundir.write_owner(run_dir, to_dict(cfg))
        (run_dir / PREEMPTED).unlink(missing_ok=True)
        record(run_dir, "start", start, world_size=world)

    logger = RunLogger(run_dir, main, cfg.log, to_dict(cfg), start)
    trace = PseudoTrace(run_dir, rank, start)
    if main:
        print(
            f"[sslfw] {world} process(es) on {device}: global batch {cfg.train.batch_size} = {world} ranks x "
            f"{per_rank} x {accum} accumulation ({streams.n_pseudo} of {per_rank} pseudo-labelled); "
            f"unlabelled x{cfg.algorithm.uratio if streams.unlabelled is not None else 0}; "
            f"steps {start}->{cfg.train.steps}; algorithm {cfg.algorithm.name}; run_dir {run_dir}",
            flush=True,
        )
    stop, nonfinite_run, skipped = StopFlag(), 0, int(info.get("skipped_steps", 0))
    bar = progress_bar(
        total=cfg.train.steps, initial=start, show=main and cfg.log.progress, unit="step", dynamic_ncols=True
    )
    t_last, exit_code, step, val, val_step = time.perf_counter(), 0, start, {}, -1

    def evaluate_now() -> dict:
        out = {}
        models = {"student": run.raw_model, "ema": run.ema.module if run.ema else None}
        for name in ("student", "ema") if cfg.eval.weights == "both" else (cfg.eval.weights,):
            if models[name] is None:
                continue
            pred = predict(
                models[name],
                eval_set,
                cfg.model.img_size,
                cfg.data.eval_batch_size,
                cfg.data.num_workers,
                rank,
                world,
                device,
                run.autocast,
            )
            out |= {f"{cfg.eval.split}/{name}/{k}": v for k, v in metrics_from_predictions(pred, constant).items()}
        return out

    def save(step: int) -> None:
        trace.flush(step)
        if main:
            payload = {
                "model": run.raw_model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "algorithm": run.algorithm.state_dict(),
                "ema": run.ema.state_dict() if run.ema else None,
            }
            # Per-rank RNG and stream positions are functions of (seed, rank, step): storing those pins them all.
            meta = {
                "step": step,
                "seed": seed,
                "world_size": world,
                "skipped_steps": skipped,
                "stream_position": step * accum,
                "rng": "reseeded each step from (seed, rank, step)",
                "lr_schedule": "warmup+cosine, a function of step (optim config)",
                "config": to_dict(cfg),
            }
            if val_step == step and (score := ckpt.val_score(val)):  # this step's evaluation ranks it (RUN/best)
                meta["val_score"] = score
            ckpt.save(run_dir, step, payload, meta, cfg.ckpt.keep, cfg.ckpt.keep_best)
        barrier()

    run.model.train()
    while step < cfg.train.steps:
        torch.manual_seed(_seed(seed, rank, step))  # drop path and anything else using the global RNG
        gen = torch.Generator(device).manual_seed(_seed(seed, rank, step, 1))
        batches = (make_batch(run, streams.next_labelled(), streams.next_unlabelled(), gen) for _ in range(accum))
        res = train_step(run, step, batches, lambda: stop.signal is not None)
        if res.applied:
            nonfinite_run = 0
        else:
            nonfinite_run, skipped = nonfinite_run + 1, skipped + 1
            if main:
                print(
                    f"[sslfw] step {step}: non-finite loss on some rank; step skipped ({nonfinite_run} in a row, "
                    f"{skipped} total)",
                    flush=True,
                )
            if nonfinite_run >= cfg.train.max_nonfinite:
                if main:
                    print(
                        f"[sslfw] stopping: {nonfinite_run} non-finite steps in a row (train.max_nonfinite). "
                        f"Lower optim.lr or check the data; the last checkpoint is intact.",
                        file=sys.stderr,
                    )
                exit_code = EXIT_NONFINITE
                break
        step += 1
        bar.update()
        for keys, level, used in res.pseudo if cfg.log.pseudo_trace else ():
            trace.add(step, keys, level, used)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            loss = res.loss if res.applied else float("nan")
            logs = mean_across_ranks({**res.logs, "loss": loss}, device)
            now = time.perf_counter()
            logs |= {"lr": res.lr, "skipped_steps": skipped, "steps_per_s": cfg.train.log_every / (now - t_last)}
            if streams.damaged:
                logs["damaged_images"] = streams.damaged  # this process's count since its start
            t_last = now
            logger.log(step, {f"train/{k}": v for k, v in logs.items()})
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps:
            val, val_step = evaluate_now(), step
            trace.flush(step)
            logger.log(step, val)
            if main and val:
                tqdm.write(eval_line(step, cfg.eval.split, val), file=sys.stdout)  # above the bar, not into it
        if res.stop:
            save(step)
            exit_code = stop.exit_code  # 130 for Ctrl-C, else 75 (Slurm requeues on it)
            if main:  # launchers hide worker exit codes, so the reason is also left in the run dir
                fsio.write_json(run_dir / PREEMPTED, {"step": step, "signal": stop.signal})
                write_exit_file(exit_code)
                print(
                    f"[sslfw] {stop.signal or 'stop signal'} on some rank: saved step-{step}, exiting with "
                    f"{exit_code} (resume with --ckpt.resume auto)",
                    flush=True,
                )
            barrier()  # the code is on disk before any rank exits: srun may end the step at the first non-zero exit
            break
        if step % cfg.ckpt.every == 0 or step == cfg.train.steps:
            save(step)
    bar.close()
    stop.restore()
    if main:
        record(run_dir, "end", step, exit_code=exit_code)
    logger.close()  # the process group stays: a pipeline runs more stages in it; the CLI destroys it at exit
    return {"exit_code": exit_code, "step": step, "skipped_steps": skipped, "val": val, "run_dir": str(run_dir)}
