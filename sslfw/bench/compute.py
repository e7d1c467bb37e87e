"""Augmentation and training steps on the training device, fed one real batch from the shards.

The step timed is the trainer's own `train_step` (forward and loss, backward with DDP's gradient all-reduce,
clipping, the scheduled lr, accumulation, optimizer, EMA), on views augmented beforehand, so the augmentation
cost is measured on its own.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from sslfw.algorithms import resolve_params
from sslfw.algorithms.base import DataInfo, StepBatch
from sslfw.bench import Table, median_seconds
from sslfw.config import Config
from sslfw.data.reader import ShardSet
from sslfw.data.stream import StreamId, TrainStream, make_loader
from sslfw.dist import SYNC, make_accelerator
from sslfw.step import build_run, make_batch, per_rank_batch, train_step


class Harness:
    """One algorithm's run (model, optimizer, EMA on the device, as the trainer builds it), stepping on fixed
    augmented views."""

    def __init__(self, cfg: Config, name: str, acc, raw: dict):
        params = cfg.algorithm.params if name == cfg.algorithm.name else {}  # else that algorithm's defaults
        cfg = replace(cfg, algorithm=replace(cfg.algorithm, name=name, params=dict(params)))
        resolve_params(cfg.algorithm)
        self.cfg, self.raw, self.step_no = cfg, raw, 0
        self.run = build_run(cfg, acc, DataInfo(raw["num_labelled"], raw["num_unlabelled"], cfg.model.proj_dim))
        self.batch = self.views()

    def views(self) -> StepBatch:
        gen = torch.Generator(self.run.acc.device).manual_seed(self.step_no)
        ulb = self.raw["ulb"] if self.run.algorithm.uses_unlabelled else None
        return make_batch(self.run, self.raw["lb"], ulb, gen)

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def images_per_step(self) -> int:
        """Images through the student in one step on this rank (views, rotations, everything the loss forwards)."""
        seen = []
        hook = self.run.raw_model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
        self.step()
        hook.remove()
        return sum(seen)

    def step(self) -> None:
        train_step(self.run, self.step_no, itertools.repeat(self.batch, self.cfg.train.grad_accum))
        self.step_no += 1


# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), FLOP/s; longest name match wins.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the card's data-sheet bf16 peak, else a measured large-matmul rate (bf16
    on a GPU, fp32 on a CPU), the best this device showed sslfw."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for card in sorted(PEAK_BF16, key=len, reverse=True):
            if card in name:
                return PEAK_BF16[card], f"{card} data-sheet dense bf16"
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = median_seconds({"mm": lambda: a @ b}, reps=5)["mm"]
    return 2 * n**3 / t, f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def step_flops(h: Harness) -> float:
    """Model FLOPs of one training step (forward and backward of every view), counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        h.step()
    return float(counter.get_total_flops())


def real_batch(cfg: Config, shards: str, per_rank: int, rank: int, device: torch.device) -> dict:
    """One labelled and one unlabelled loader batch (uint8 crops), moved to the device once."""
    crop = (cfg.data.load_crop, cfg.data.load_crop)
    lb_set, ulb_set = ShardSet(shards, "train"), ShardSet(shards, "unlabelled")
    lb = next(iter(make_loader(TrainStream(lb_set, per_rank, crop, 0, rank, StreamId.LABELLED), 0)))
    ulb = next(
        iter(make_loader(TrainStream(ulb_set, per_rank * cfg.algorithm.uratio, crop, 0, rank, StreamId.UNLABELLED), 0))
    )
    lb, ulb = ({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in (lb, ulb))
    return {"lb": lb, "ulb": ulb, "num_labelled": len(lb_set), "num_unlabelled": len(ulb_set)}


def _setup(cfg: Config, shards: str):
    acc = make_accelerator(cfg.train.precision)
    return acc, real_batch(cfg, shards, per_rank_batch(cfg, acc.num_processes), acc.process_index, acc.device)


def bench_augment(cfg: Config, shards: str, steps: int, reps: int) -> Table:
    """Weak + strong views of one step's batch, per policy, against that step (FixMatch's views and loss)."""
    acc, raw = _setup(cfg, shards)
    table = Table(
        f"augment: per-sample views vs one training step (fixmatch, {cfg.model.name} at "
        f"{cfg.model.img_size}px, {acc.num_processes} process(es) on {acc.device.type}, "
        f"labelled {len(raw['lb']['image'])} + unlabelled {len(raw['ulb']['image'])} per rank)",
        ["strong policy", "augment ms", "step ms", "augment / step", "target"],
    )
    for policy in ("iqa_safe", "randaugment"):
        h = Harness(replace(cfg, aug=replace(cfg.aug, strong=policy)), "fixmatch", acc, raw)
        t = median_seconds(
            {"aug": lambda h=h: [h.views() for _ in range(steps)], "step": lambda h=h: h.steps(steps)}, reps
        )
        table.add(policy, 1e3 * t["aug"] / steps, 1e3 * t["step"] / steps, t["aug"] / t["step"], "< 0.05 on a GPU")
    return table


def bench_step(cfg: Config, shards: str, algorithms: list[str], steps: int, reps: int) -> Table:
    """Images/s per algorithm against the supervised step (same model, same labelled batch), and the share of the
    step spent in the algorithms' own collectives (banks, global statistics)."""
    acc, raw = _setup(cfg, shards)
    world = acc.num_processes
    table = Table(
        f"step: {cfg.model.name} at {cfg.model.img_size}px, global labelled batch "
        f"{cfg.train.batch_size}, uratio {cfg.algorithm.uratio}, {world} process(es) on {acc.device.type}"
        f"{', ' + acc.mixed_precision if acc.mixed_precision != 'no' else ''}",
        [
            "algorithm",
            "step ms",
            "images through the model/step",
            "images/s",
            "step time / supervised",
            "bank+stats sync ms",
            "sync / step",
            "GFLOP/step",
            "TFLOP/s",
            "MFU",
            "peak MiB/image",
            "target",
        ],
    )
    peak, source = peak_flops(acc.device)
    table.notes.append(
        f"MFU: counted model FLOPs (torch.utils.flop_counter) per second / {peak / 1e12:.3g} TFLOP/s ({source})"
    )
    base = None
    for name in ["supervised"] + [a for a in algorithms if a != "supervised"]:
        h = Harness(cfg, name, acc, raw)
        h.steps(steps)  # warm-up: allocator, kernel selection and the first bank fills happen here
        SYNC.update(on=True, seconds=0.0)
        t = median_seconds({"step": lambda h=h: h.steps(steps)}, reps, warmup=0)["step"] / steps
        sync_ms = 1e3 * SYNC["seconds"] / (reps * steps)
        SYNC.update(on=False)
        base = base or t
        images = h.images_per_step() * world
        flops = step_flops(h) * world
        mem = "-"
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
            h.step()
            mem = torch.cuda.max_memory_allocated(acc.device) / 2**20 / (images / world)
        table.add(
            name,
            1e3 * t,
            images,
            images / t,
            t / base,
            sync_ms,
            sync_ms / (1e3 * t),
            flops / 1e9,
            flops / t / 1e12,
            flops / t / (peak * world),
            mem,
            "sync < 0.05" if world > 1 else "",
        )
    return table


def bench_speedups(cfg: Config, shards: str, steps: int, reps: int, compile_model: bool) -> Table:
    """FixMatch's step before and after each speed-up, the variants timed in turn within every repetition:
    USB's order (every view through one forward with autograd, per-tensor AdamW), then the weak view without
    autograd, the fused AdamW kernel and, when asked, torch.compile. Tests check each gives the same losses."""
    acc, raw = _setup(cfg, shards)
    base = replace(
        cfg, train=replace(cfg.train, weak_no_grad=False, compile=False), optim=replace(cfg.optim, fused=False)
    )
    variants = {
        "before: one forward with autograd for all views, per-tensor AdamW": base,
        "+ weak view without autograd": replace(base, train=replace(base.train, weak_no_grad=True)),
    }
    variants["+ fused AdamW"] = replace(variants["+ weak view without autograd"], optim=replace(cfg.optim, fused=True))
    if compile_model:
        last = variants["+ fused AdamW"]
        variants["+ torch.compile"] = replace(last, train=replace(last.train, compile=True))
    harnesses = {name: Harness(c, "fixmatch", acc, raw) for name, c in variants.items()}
    for h in harnesses.values():
        h.steps(max(steps, 3))  # warm-up, and compilation for the compiled variant
    t = median_seconds({name: (lambda h=h: h.steps(steps)) for name, h in harnesses.items()}, reps, warmup=0)
    table = Table(
        f"step speed-ups: fixmatch, {cfg.model.name} at {cfg.model.img_size}px, global labelled batch "
        f"{cfg.train.batch_size}, uratio {cfg.algorithm.uratio}, {acc.num_processes} process(es) on {acc.device.type}",
        ["variant", "step ms", "before / this (speed-up)", "weak view apart"],
    )
    first = next(iter(t.values()))
    for name, h in harnesses.items():
        apart = "yes" if h.run.split_weak else "no" if not h.cfg.train.weak_no_grad else "no (BatchNorm model)"
        table.add(name, 1e3 * t[name] / steps, first / t[name], apart)
    return table
