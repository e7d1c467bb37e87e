"""`sslfw pseudolabel`: distributed inference over the unlabelled shards with a trained checkpoint.

The set is cut into fixed chunks of samples (independent of the number of ranks); rank r takes chunks r, r+W, ...,
streams them through one loader and writes each as `OUT.parts/chunk-NNNNNN.npz`, atomically, once complete. A
rerun skips chunks already written, even with a different number of ranks, so an interrupted job resumes without
duplicates. Rank 0 then merges the chunks, checks that every sample of the shard index appears exactly once, and
writes OUT (csv) atomically:
key, idx, p0..p4, label, confidence, score. The loop runs no collective, so ranks may finish at different times.
SIGUSR1/SIGTERM stop a rank after its current chunk; the job then exits with EXIT_PREEMPTED and a rerun resumes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslfw import ckpt, faults, fsio
from sslfw.data.pseudo import COLUMNS
from sslfw.data.reader import ShardSet
from sslfw.data.stream import ChunkStream, make_loader
from sslfw.dist import any_across_ranks, autocast_for, barrier, make_accelerator
from sslfw.errors import DataError
from sslfw.evaluate import concat, predict_batch, score_of
from sslfw.inference import load_model
from sslfw.logger import progress_bar
from sslfw.preempt import EXIT_PREEMPTED, StopFlag, write_exit_file
from sslfw.rundir import lock_on_main


def pseudolabel(
    checkpoint: Path,
    out: Path,
    shards: Path | None = None,
    weights: str = "ema",
    crops: int = 1,
    batch_size: int = 64,
    num_workers: int = 2,
    chunk: int = 1024,
    progress: bool = True,
) -> dict:
    acc = make_accelerator(bf16=True)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    model, cfg, ckpt_dir = load_model(checkpoint, weights)
    model.to(device)
    pool = ShardSet(shards or cfg.data.shards, "unlabelled", cfg.data.jpeg_on_device)
    n = len(pool)
    if n == 0:
        raise DataError(f"{pool.root}: the unlabelled set is empty: nothing to pseudo-label (pack a pool with --kadis)")
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out}: is a folder; give the csv file to write")
    parts = out.with_name(out.name + ".parts")
    # What the chunks are predictions of: a chunk made under another fingerprint (another pack of the pool, another
    # checkpoint, weights or crops) must never be merged into this csv.
    state_sha = ckpt.recorded_sha256(ckpt_dir)
    job = {
        "checkpoint": str(ckpt_dir.resolve()),
        "checkpoint_sha256": state_sha,
        "weights": weights,
        "crops": crops,
        "chunk": chunk,
        "samples": n,
        "shards": str(pool.root.resolve()),
        "pool_fingerprint": pool.fingerprint,
    }
    # Every rank checks (a rank that raised alone would leave the others waiting at the barrier).
    if (parts / "job.json").is_file():
        old = json.loads((parts / "job.json").read_text())
        changed = [k for k in job if old.get(k) != job[k]]
        if changed:
            raise DataError(
                f"{parts}: holds chunks of another job ({', '.join(changed)} differ); "
                f"delete that folder or choose another --out"
            )
    lock = lock_on_main(parts, f"sslfw pseudolabel (--out {out})", acc.is_main_process, device)
    if acc.is_main_process:
        fsio.write_json(parts / "job.json", job)
    barrier()

    autocast = autocast_for(acc)
    mine = list(range(rank, math.ceil(n / chunk), world))
    todo = [c for c in mine if not (parts / f"chunk-{c:06d}.npz").is_file()]
    ranges = [range(c * chunk, min(n, (c + 1) * chunk)) for c in todo]
    bar = progress_bar(
        total=sum(len(r) for r in ranges), unit="img", desc="pseudo-labelling", show=progress and acc.is_main_process
    )
    t0, done, stop = time.perf_counter(), 0, StopFlag()
    size = (cfg.model.img_size, cfg.model.img_size)
    for pos, pred in predict_chunks(model, pool, ranges, batch_size, size, crops, num_workers, device, autocast):
        bar.update(len(pred["idx"]))
        c = todo[pos]
        with fsio.atomic_open(parts / f"chunk-{c:06d}.npz") as f:
            np.savez(f, **pred)
        done += len(ranges[pos])
        faults.inject(rank, c)
        if stop.signal:
            break
    bar.close()
    stop.restore()
    elapsed = time.perf_counter() - t0
    # Every rank gets here (a stopped rank early): agree whether the set is complete before merging.
    stopped = any_across_ranks([stop.signal is not None], device)[0]
    summary = {
        "samples": n,
        "chunks_reused": len(mine) - len(todo),
        "rank0_images": done,
        "rank0_images_per_s": round(done / elapsed, 1) if done else None,
        "out": str(out),
        "exit_code": EXIT_PREEMPTED if stopped else 0,
    }
    if acc.is_main_process:
        if stopped:
            write_exit_file(EXIT_PREEMPTED)  # before any rank exits (srun may end the step at the first one)
        else:
            summary |= merge(parts, out, n)
    if lock is not None:
        lock.release()
    barrier()
    return summary


@torch.no_grad()
def predict_chunks(
    model: nn.Module,
    pool: ShardSet,
    ranges: list[range],
    batch_size: int,
    size: tuple[int, int],
    crops: int,
    num_workers: int,
    device: torch.device,
    autocast,
) -> Iterator[tuple[int, dict]]:
    """(position in `ranges`, predictions) for each range as soon as all its samples are predicted. One loader
    serves all ranges, so its workers decode the next chunk while the model runs on this one."""
    if not ranges:
        return
    model.eval()
    pending: dict[int, list] = {}
    left = [len(r) for r in ranges]
    for batch in make_loader(
        ChunkStream(pool, ranges, batch_size, size, crops), num_workers, pin_memory=device.type == "cuda"
    ):
        pos = int(batch.pop("chunk"))
        pending.setdefault(pos, []).append(predict_batch(model, batch, device, autocast))
        left[pos] -= len(batch["idx"])
        if left[pos] == 0:
            yield pos, concat(pending.pop(pos))


def merge(parts: Path, out: Path, n: int) -> dict:
    """Join the chunk files into OUT, after checking that they hold every sample exactly once."""
    chunks = [np.load(p) for p in sorted(parts.glob("chunk-*.npz"))]
    idx = np.concatenate([c["idx"] for c in chunks])
    if len(idx) != n or not np.array_equal(np.sort(idx), np.arange(n)):
        raise RuntimeError(
            f"{parts}: {len(idx)} predictions for {len(np.unique(idx))} distinct of {n} samples; "
            f"expected each exactly once"
        )
    order = np.argsort(idx)
    keys = np.concatenate([c["key"] for c in chunks])[order]
    probs = np.concatenate([c["probs"] for c in chunks])[order]
    score = np.concatenate([score_of(c) for c in chunks])[order]
    label, conf = probs.argmax(1), probs.max(1)
    rows = [
        [k, i, *(f"{p:.6f}" for p in pr), int(lb), f"{cf:.6f}", f"{sc:.6f}"]
        for k, i, pr, lb, cf, sc in zip(keys, np.arange(n), probs, label, conf, score)
    ]
    fsio.write_csv(out, COLUMNS, rows)
    return {
        "label_counts": np.bincount(label, minlength=probs.shape[1]).tolist(),
        "mean_confidence": round(float(conf.mean()), 4),
    }
