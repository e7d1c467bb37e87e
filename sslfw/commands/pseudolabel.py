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

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sslfw import ckpt, faults, fsio
from sslfw.data.pseudo import COLUMNS, sidecar
from sslfw.data.reader import ShardSet
from sslfw.data.stream import ChunkStream, make_loader
from sslfw.dist import any_across_ranks, autocast_for, barrier, make_accelerator
from sslfw.errors import DataError
from sslfw.evaluate import concat, predict_batch, score_of
from sslfw.inference import load_model
from sslfw.logger import progress_bar
from sslfw.preempt import EXIT_PREEMPTED, StopFlag, write_exit_file
from sslfw.rundir import lock_on_main


def _claim_parts(parts: Path, job: dict, out: Path, acc) -> object:
    """Lock the chunk folder for this job and record what its chunks are predictions of; chunks of another job
    there are refused on every rank (a rank that raised alone would leave the others waiting at the barrier)."""
    if (parts / "job.json").is_file():
        old = fsio.read_json(parts / "job.json", f"delete {parts} (it holds only resumable chunks) and rerun")
        changed = [k for k in job if old.get(k) != job[k]]
        if changed:
            raise DataError(
                f"{parts}: holds chunks of another job ({', '.join(changed)} differ); "
                f"delete that folder or choose another --out"
            )
    lock = lock_on_main(parts, f"sslfw pseudolabel (--out {out})", acc.is_main_process, acc.device)
    if acc.is_main_process:
        fsio.write_json(parts / "job.json", job)
    barrier()
    return lock


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
    acc = make_accelerator()
    device = acc.device
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
    job = {
        "checkpoint": str(ckpt_dir.resolve()),
        "checkpoint_sha256": ckpt.recorded_sha256(ckpt_dir),
        "weights": weights,
        "crops": crops,
        "chunk": chunk,
        "samples": n,
        "shards": str(pool.root.resolve()),
        "pool_fingerprint": pool.fingerprint,
    }
    lock = _claim_parts(parts, job, out, acc)
    mine = list(range(acc.process_index, math.ceil(n / chunk), acc.num_processes))
    todo = [c for c in mine if not (parts / f"chunk-{c:06d}.npz").is_file()]
    loader = (chunk, crops, batch_size, num_workers)
    done, elapsed, stop_signal = _score_chunks(model, cfg, pool, parts, todo, *loader, acc, progress)
    # Every rank gets here (a stopped rank early): agree whether the set is complete before merging.
    stopped = any_across_ranks([stop_signal is not None], device)[0]
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
            summary |= merge(parts, out, n, job)
    if lock is not None:
        lock.release()
    barrier()
    return summary


def _score_chunks(
    model, cfg, pool: ShardSet, parts: Path, todo: list[int], chunk: int, crops: int, batch_size: int,
    num_workers: int, acc, progress: bool,
) -> tuple[int, float, str | None]:  # fmt: skip
    """Predict this rank's missing chunks, each saved atomically as it completes (a stop signal ends the loop
    between chunks); (images scored, seconds, the signal that stopped it or None)."""
    n, rank, device = len(pool), acc.process_index, acc.device
    ranges = [range(c * chunk, min(n, (c + 1) * chunk)) for c in todo]
    show = progress and acc.is_main_process
    bar = progress_bar(total=sum(len(r) for r in ranges), unit="img", desc="pseudo-labelling", show=show)
    t0, done, stop = time.perf_counter(), 0, StopFlag()
    size = (cfg.model.img_size, cfg.model.img_size)
    batches = predict_chunks(model, pool, ranges, batch_size, size, crops, num_workers, device, autocast_for(acc))
    for pos, pred in batches:
        bar.update(len(pred["idx"]))
        with fsio.atomic_open(parts / f"chunk-{todo[pos]:06d}.npz") as f:
            np.savez(f, **pred)
        done += len(ranges[pos])
        faults.inject(rank, todo[pos])
        if stop.signal:
            break
    bar.close()
    stop.restore()
    return done, time.perf_counter() - t0, stop.signal


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


def merge(parts: Path, out: Path, n: int, job: dict) -> dict:
    """Join the chunk files into OUT, after checking that they hold every sample exactly once; OUT.json records what
    the csv was made from (the job: checkpoint sha256, pool fingerprint) for the run that trains on it."""
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
    fsio.write_json(sidecar(out), job | {"csv_sha256": fsio.sha256_file(out)})
    return {
        "label_counts": np.bincount(label, minlength=probs.shape[1]).tolist(),
        "mean_confidence": round(float(conf.mean()), 4),
    }
