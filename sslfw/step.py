"""One optimizer step: the run's parts on the device (`build_run`), a batch's views (`make_batch`) and the step
itself (`train_step`). The trainer and `sslfw bench step` both go through here, so what is benchmarked is what
trains."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from sslfw import ckpt, faults
from sslfw.algorithms import get_algorithm
from sslfw.algorithms.base import Algorithm, DataInfo, StepBatch, StepContext, Views
from sslfw.augment import Augmenter
from sslfw.config import Config, to_dict
from sslfw.data.jpeg import images_on
from sslfw.dist import any_across_ranks, autocast_for
from sslfw.ema import EMATeacher
from sslfw.errors import ConfigError
from sslfw.model import IQAModel
from sslfw.optim import build_optimizer, set_lr


def seed_of(*parts: int) -> int:
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
    checkpointer: ckpt.Checkpointer  # saves and restores model, optimizer, algorithm and EMA teacher together


def build_run(cfg: Config, acc: Accelerator, data: DataInfo, state: dict | None = None) -> Run:
    """Model, algorithm, optimizer and EMA on the device, registered with one checkpointer, from `state` (a
    checkpoint's) when resuming."""
    algo_cls = get_algorithm(cfg.algorithm.name)
    torch.manual_seed(cfg.train.seed)  # the same init on every rank; DDP then keeps the replicas equal
    model = IQAModel(cfg.model, algo_cls.extra_heads, algo_cls.projection, algo_cls.score_head, data.edges)
    algorithm = algo_cls(cfg.algorithm, data).to(acc.device)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMATeacher(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
    parts = {"model": model, "optimizer": optimizer, "algorithm": algorithm, "ema": ema}
    info = {"seed": cfg.train.seed, "world_size": acc.num_processes, "grad_accum": cfg.train.grad_accum}
    checkpointer = ckpt.Checkpointer(cfg.run_dir, cfg.ckpt, acc.is_main_process, parts, **info, config=to_dict(cfg))
    if state:
        checkpointer.restore(state)  # before prepare: the unwrapped modules, on the CPU
    if ema is not None:
        ema.module.to(acc.device)
    if cfg.train.compile:  # in place: state_dict keys stay the same, and the EMA deep copy above stays eager
        model.compile()
    model, optimizer = acc.prepare(model, optimizer)  # never the loaders: they are per-rank streams already
    checkpointer.parts |= {"model": acc.unwrap_model(model), "optimizer": optimizer}  # what the old code saved
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
        autocast_for(acc),
        cfg.train.weak_no_grad and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        checkpointer,
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
