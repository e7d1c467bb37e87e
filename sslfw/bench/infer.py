"""Pseudo-labelling: the job's own loop (chunks of the pool through the shard stream) against a forward-only loop
over the same images preloaded on the device."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from sslfw.bench import Table, median_seconds
from sslfw.commands.pseudolabel import predict_chunks
from sslfw.config import Config
from sslfw.data.reader import ShardSet
from sslfw.data.stream import ChunkStream, EvalStream, make_loader
from sslfw.dist import autocast_for, make_accelerator
from sslfw.model import IQAModel


def bench_pseudolabel(cfg: Config, shards: str, batch: int, workers: int, chunk: int, limit: int, reps: int) -> Table:
    acc = make_accelerator(cfg.train.precision)
    device = acc.device
    autocast = autocast_for(acc)
    torch.manual_seed(0)
    model = IQAModel(cfg.model).to(device).eval()  # random weights: the speed does not depend on them
    pool = ShardSet(shards, "unlabelled")
    n = min(limit, len(pool)) if limit else len(pool)
    size = (cfg.model.img_size, cfg.model.img_size)

    ranges = [range(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]

    def job() -> None:  # the loop of sslfw/commands/pseudolabel.py, without writing the chunk files
        for _ in predict_chunks(model, pool, ranges, batch, size, 1, workers, device, autocast):
            pass

    preloaded = [b["image"].to(device) for b in make_loader(EvalStream(pool, batch, size, 0, 1, ids=range(n)), 0)]

    @torch.no_grad()
    def forward_only() -> None:
        for x in preloaded:
            with autocast():
                logits = model(x.float() / 255)["logits"]
            logits.float().softmax(-1).cpu()

    def stream_only() -> None:  # the loader side of the job alone: where the time goes when the ratio is low
        for _ in make_loader(ChunkStream(pool, ranges, batch, size), workers):
            pass

    t = median_seconds({"job": job, "forward": forward_only, "stream": stream_only}, reps)
    table = Table(
        f"pseudolabel: {n} pool images, {cfg.model.name} at {cfg.model.img_size}px, batch {batch}, "
        f"{workers} loader worker(s), chunks of {chunk}, {device.type}"
        f"{', ' + acc.mixed_precision if autocast is not nullcontext else ''}",
        ["path", "images/s", "ratio to forward-only", "target"],
    )
    table.add("forward only, images preloaded on the device", n / t["forward"], 1.0, "")
    table.add("shard stream alone (decode + crop, no model)", n / t["stream"], t["forward"] / t["stream"], "")
    table.add("pseudolabel loop (shards -> decode -> crop -> model)", n / t["job"], t["forward"] / t["job"], ">= 0.9")
    serial = t["stream"] + t["forward"]
    table.notes.append(
        f"if loading and the model could not overlap at all (both on the same cores), the loop would "
        f"run at {n / serial:.4g} images/s; it runs at {serial / t['job']:.2f} of that"
    )
    return table
