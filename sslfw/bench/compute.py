"""Augmentation and training steps on the training device, fed one real batch from the shards.

The step is what the trainer runs per optimizer step (algorithm loss, backward with DDP's gradient all-reduce,
optimizer, EMA update), on views augmented beforehand, so the augmentation cost is measured on its own.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch

from sslfw.algorithms import get_algorithm
from sslfw.algorithms.base import StepBatch, StepContext
from sslfw.augment import Augmenter
from sslfw.bench import Table, median_seconds
from sslfw.config import Config
from sslfw.data.stream import ShardSet, TrainStream, make_loader
from sslfw.dist import SYNC, make_accelerator
from sslfw.ema import EMATeacher
from sslfw.model import IQAModel
from sslfw.optim import build_optimizer


class Harness:
    """One algorithm's model, optimizer and EMA on the device, stepping on fixed augmented views."""

    def __init__(self, cfg: Config, name: str, acc, raw: dict):
        self.acc = acc
        self.algo_cls = get_algorithm(name)
        torch.manual_seed(cfg.train.seed)
        model = IQAModel(cfg.model, self.algo_cls.extra_heads, self.algo_cls.projection)
        self.algorithm = self.algo_cls(replace(cfg.algorithm, name=name), raw["num_labelled"],
                                       cfg.model.proj_dim).to(acc.device)
        self.ema = EMATeacher(model, cfg.ema.decay) if cfg.ema.enabled else None
        if self.ema is not None:
            self.ema.module.to(acc.device)
        self.model, self.optimizer = acc.prepare(model, build_optimizer(model, cfg.optim))
        self.raw_model = acc.unwrap_model(self.model)
        self.augment = Augmenter(cfg.aug, cfg.model.img_size)
        self.num_strong = max(self.algo_cls.num_strong, cfg.aug.num_strong if self.algo_cls.num_strong else 0)
        self.raw, self.step_no = raw, 0
        self.autocast = acc.autocast if acc.device.type == "cuda" and cfg.train.bf16 else nullcontext
        self.batch = self.views()

    def views(self) -> StepBatch:
        gen = torch.Generator(self.acc.device).manual_seed(self.step_no)
        r = self.raw
        batch = StepBatch(self.augment.weak(r["x_lb"], gen), r["y_lb"], r["idx_lb"])
        if self.algo_cls.uses_unlabelled:
            batch.x_ulb_w = self.augment.weak(r["x_ulb"], gen)
            batch.x_ulb_s = [self.augment.strong(r["x_ulb"], gen) for _ in range(self.num_strong)]
            batch.idx_ulb = r["idx_ulb"]
        return batch

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def images_per_step(self) -> int:
        """Images through the student in one step on this rank (views, rotations, everything the loss forwards)."""
        seen = []
        hook = self.raw_model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
        self.step()
        hook.remove()
        return sum(seen)

    def step(self) -> None:
        ctx = StepContext(self.step_no, 10**6, self.ema.module if self.ema else None, self.raw["num_labelled"])
        with self.autocast():
            out = self.algorithm.step(self.model, self.batch, ctx)
        self.acc.backward(out.loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        self.step_no += 1


def real_batch(cfg: Config, shards: str, per_rank: int, rank: int, device: torch.device) -> dict:
    """One labelled and one unlabelled loader batch (uint8 crops), moved to the device."""
    crop = (cfg.data.load_crop, cfg.data.load_crop)
    lb_set, ulb_set = ShardSet(shards, "train"), ShardSet(shards, "unlabelled")
    lb = next(iter(make_loader(TrainStream(lb_set, per_rank, crop, 0, rank, 0), 0)))
    ulb = next(iter(make_loader(TrainStream(ulb_set, per_rank * cfg.algorithm.uratio, crop, 0, rank, 1), 0)))
    return {"x_lb": lb["image"].to(device), "y_lb": lb["label"].to(device), "idx_lb": lb["idx"].to(device),
            "x_ulb": ulb["image"].to(device), "idx_ulb": ulb["idx"].to(device), "num_labelled": len(lb_set)}


def _setup(cfg: Config, shards: str):
    acc = make_accelerator(cfg.train.bf16)
    per_rank = cfg.train.batch_size // acc.num_processes
    return acc, real_batch(cfg, shards, per_rank, acc.process_index, acc.device)


def bench_augment(cfg: Config, shards: str, steps: int, reps: int) -> Table:
    """Weak + strong views of one step's batch, per policy, against that step (FixMatch's views and loss)."""
    acc, raw = _setup(cfg, shards)
    table = Table(f"augment: per-sample views vs one training step (fixmatch, {cfg.model.name} at "
                  f"{cfg.model.img_size}px, {acc.num_processes} process(es) on {acc.device.type}, "
                  f"labelled {len(raw['x_lb'])} + unlabelled {len(raw['x_ulb'])} per rank)",
                  ["strong policy", "augment ms", "step ms", "augment / step", "target"])
    for policy in ("iqa_safe", "randaugment"):
        h = Harness(replace(cfg, aug=replace(cfg.aug, strong=policy)), "fixmatch", acc, raw)
        t = median_seconds({"aug": lambda: [h.views() for _ in range(steps)], "step": lambda: h.steps(steps)}, reps)
        table.add(policy, 1e3 * t["aug"] / steps, 1e3 * t["step"] / steps, t["aug"] / t["step"],
                  "< 0.05 on a GPU")
    return table


def bench_step(cfg: Config, shards: str, algorithms: list[str], steps: int, reps: int) -> Table:
    """Images/s per algorithm against the supervised step (same model, same labelled batch), and the share of the
    step spent in the algorithms' own collectives (banks, global statistics)."""
    acc, raw = _setup(cfg, shards)
    world = acc.num_processes
    table = Table(f"step: {cfg.model.name} at {cfg.model.img_size}px, global labelled batch "
                  f"{cfg.train.batch_size}, uratio {cfg.algorithm.uratio}, {world} process(es) on {acc.device.type}"
                  f"{', bf16' if cfg.train.bf16 and acc.device.type == 'cuda' else ''}",
                  ["algorithm", "step ms", "images through the model/step", "images/s", "step time / supervised",
                   "bank+stats sync ms", "sync / step", "target"])
    base = None
    for name in ["supervised"] + [a for a in algorithms if a != "supervised"]:
        h = Harness(cfg, name, acc, raw)
        h.steps(steps)  # warm-up: allocator, kernel selection and the first bank fills happen here
        SYNC.update(on=True, seconds=0.0)
        t = median_seconds({"step": lambda: h.steps(steps)}, reps, warmup=0)["step"] / steps
        sync_ms = 1e3 * SYNC["seconds"] / (reps * steps)
        SYNC.update(on=False)
        base = base or t
        images = h.images_per_step() * world
        table.add(name, 1e3 * t, images, images / t, t / base, sync_ms, sync_ms / (1e3 * t),
                  "sync < 0.05" if world > 1 else "")
    return table
