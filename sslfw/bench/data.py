"""Data: the shard stream against plain decode + crop of the same images held in memory (the per-core limit;
the images must be at least as large as the crop). For JPEG sets also the stream with the decoding left to the
device (`data.jpeg_on_device`) and that device's batched decode + crop rate."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from sslfw.bench import Table, median_seconds, sync
from sslfw.data import zpix
from sslfw.data.jpeg import JPEG_MAGIC, images_on
from sslfw.data.reader import NPY_MAGIC, ShardSet
from sslfw.data.stream import PREFETCH, TrainStream, make_loader


def _decode_limit(blobs: list[bytes], crop: int) -> Callable[[], None]:
    """The irreducible work of a loader: decode each image from memory, then copy out one crop window."""

    def run() -> None:
        rng = np.random.default_rng(0)
        for b in blobs:
            if (z := zpix.header(b[:64])) is not None:  # --pixels zstd: the blocks holding the crop's rows
                y, x = int(rng.integers(z[0] - crop + 1)), int(rng.integers(z[1] - crop + 1))
                zpix.read_rows(lambda o, n, b=b: b[o : o + n], z, y, crop)[:, x : x + crop]
                continue
            if b[:6] == NPY_MAGIC:  # --pixels raw: nothing to decode, the crop is a copy
                a = np.load(io.BytesIO(b))
                y, x = int(rng.integers(a.shape[0] - crop + 1)), int(rng.integers(a.shape[1] - crop + 1))
                np.ascontiguousarray(a[y : y + crop, x : x + crop])
                continue
            with Image.open(io.BytesIO(b)) as im:
                im.load()
                w, h = im.size
                y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
                np.asarray(im.crop((x, y, x + crop, y + crop)))

    return run


def _stream_timer(shard_set: ShardSet, batch: int, crop: int, batches: int, nw: int) -> Callable[[], float]:
    """Seconds for nw x `batches` batches of a fresh loader with `nw` workers (a fresh one per round: no idle
    workers decoding in the background while other paths are timed; its start-up and first queued batches are not
    timed)."""

    def run() -> float:
        it = iter(make_loader(TrainStream(shard_set, batch, (crop, crop), seed=0, rank=0), nw))
        for _ in range(max(nw, 1) * PREFETCH):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches * max(nw, 1)):
            next(it)
        elapsed = time.perf_counter() - t0
        del it  # stops the workers
        return elapsed

    return run


def _device_decoder(
    shards: str, split: str, batch: int, crop: int, batches: int
) -> tuple[Callable[[], None], torch.device]:
    """Batched JPEG decode + crop on the device (nvJPEG on a GPU) of the same batches the deferred stream yields."""
    deferred = ShardSet(shards, split, jpeg_on_device=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoded = [TrainStream(deferred, batch, (crop, crop), seed=0, rank=0).make_batch(s) for s in range(batches)]

    def run() -> None:
        for b in encoded:
            images_on(b, device)
        sync()

    return run, device


def bench_data(
    shards: str, crop: int, batch: int, batches: int, workers: list[int], reps: int, split: str = "train"
) -> Table:
    """The shard stream of one set (`split`: train, or unlabelled for the pool's pixel format) against decoding the
    same images from memory on one core."""
    Image.core.set_blocks_max(16)  # as in the loader's workers: the limit gets the same decoder settings
    lb = ShardSet(shards, split)
    ref = TrainStream(lb, batch, (crop, crop), seed=0, rank=0)
    ids = np.concatenate([ref.batch_indices(s) for s in range(batches)])
    blobs = [lb.read(int(i))[0] for i in ids]  # the bytes the stream will read, already in memory
    fns = {"limit": _decode_limit(blobs, crop)}
    fns |= {f"stream{nw}": _stream_timer(lb, batch, crop, batches, nw) for nw in workers}
    jpeg = sum(b[:3] == JPEG_MAGIC for b in blobs) / len(blobs)  # KonIQ's part; the extras are PNG
    if jpeg:
        deferred = ShardSet(shards, split, jpeg_on_device=True)
        fns |= {f"deferred{nw}": _stream_timer(deferred, batch, crop, batches, nw) for nw in workers}
        fns["device"], device = _device_decoder(shards, split, batch, crop, batches)
    t = median_seconds(fns, reps)
    n = len(ids)
    table = Table(
        f"data: {split} shard stream ({lb.pixels} pixels) vs decode+crop of the same {n} images in memory ({crop}px "
        f"crops, batch {batch})",
        ["path", "workers", "images/s", "images/s per worker", "ratio to limit", "target"],
    )
    per_core = n / t["limit"]
    table.add("decode+crop from memory (limit, 1 core)", 1, per_core, per_core, 1.0, "")
    paths = [("stream", "shard stream -> uint8 batches", ">= 0.85")]
    if jpeg:  # per worker above 1: the workers' share costs less than decoding
        paths.append(("deferred", f"stream, JPEG ({jpeg:.0%} of images) left to the device", ""))
    for key, label, target in paths:
        for nw in workers:
            rate = n * max(nw, 1) / t[f"{key}{nw}"]
            per_worker = rate / max(nw, 1)
            table.add(label, nw if nw else "0 (in process)", rate, per_worker, per_worker / per_core, target)
    if jpeg:
        rate = n / t["device"]
        table.add(f"batched JPEG decode + crop on {device.type}", 1, rate, "", rate / per_core, "")
    return table
