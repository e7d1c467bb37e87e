"""Streams over packed shards for training, evaluation and inference, safe under DDP with any worker count.

Training (`TrainStream`): infinite and resampled. Rank r's sample sequence is a chain of blocks; block j picks a few
shards at random (weighted by size, seeded by (seed, stream, rank, j)) and permutes their samples. Batch `step` is
positions [step*B, (step+1)*B) of that sequence, and its random crops are seeded by (seed, stream, rank, step). So a
batch is a pure function of (seed, stream, rank, step): a run resumed at step k reads exactly the batches the
uninterrupted run read from step k, whatever the number of workers; labelled and unlabelled streams differ by
`stream`. Every rank yields forever, so ranks never run out at different steps (the classic webdataset DDP hang).

Evaluation (`EvalStream`): finite. The set's samples are cut into world_size x num_workers contiguous ranges, so
every sample is read exactly once across all ranks and workers, also when there are fewer shards than that. Ranks
may yield different batch counts: callers run no collective inside the loop and gather afterwards.

Both read samples by seeking to offsets recorded at pack time, decode with PIL in DataLoader workers and take a
native-resolution crop (no resize: resizing changes perceived quality). Output images are uint8 NCHW tensors.
"""

from __future__ import annotations

import math
import signal
from bisect import bisect_right
from collections.abc import Iterator
from enum import IntEnum
from itertools import count

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslfw.data.jpeg import split_deferred
from sslfw.data.labels import LabelScheme
from sslfw.data.reader import ShardSet, decode_pad, read_image
from sslfw.errors import DataError

PREFETCH = 4  # batches each loader worker keeps ready


def stack_images(parts: list[np.ndarray], join: bool = False) -> torch.Tensor:
    """HWC crops (or, with `join`, (n, H, W, C) groups end to end) as one uint8 NCHW tensor, written once.

    In a loader worker the tensor is allocated in shared memory, so the crops are copied straight into the pages
    the main process maps: np.stack into private memory made the loader copy every batch a second time when it
    sent it (BENCHMARKS.md, "shared memory"). NCHW is a view of NHWC memory: the transposing copy is left to the
    device (consumers index or .float() it)."""
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:]) if join else (len(parts), *parts[0].shape)
    if get_worker_info() is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
    (np.concatenate if join else np.stack)(parts, out=out.numpy())
    return out.movedim(-1, -3)


def collate(samples: list[tuple[np.ndarray, dict]], join: bool = False) -> dict[str, torch.Tensor]:
    """Images to one uint8 NCHW tensor (crops left for the device to decode are blank there, their files in
    "jpeg"); labels, indices and MOS (NaN where unknown) to vectors."""
    metas = [s[1] for s in samples]
    pixels, deferred = split_deferred([s[0] for s in samples])
    return deferred | {
        "image": stack_images(pixels, join),
        "key": [m["key"] for m in metas],
        "label": torch.tensor([m["label"] for m in metas], dtype=torch.int64),
        "idx": torch.tensor([m["idx"] for m in metas], dtype=torch.int64),
        "mos": torch.tensor(
            [m.get("mos") if m.get("mos") is not None else float("nan") for m in metas], dtype=torch.float32
        ),
    }


class StreamId(IntEnum):
    """Which random stream a TrainStream draws; the id enters every seed, so two streams never repeat each other."""

    LABELLED = 0
    UNLABELLED = 1
    PSEUDO_LABELLED = 2


class TrainStream(IterableDataset):
    """Infinite resampled batches for one rank; batch `step` depends only on (seed, stream, rank, step)."""

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        crop: tuple[int, int],
        seed: int,
        rank: int,
        stream: StreamId = StreamId.LABELLED,
        start_step: int = 0,
        shards_per_block: int = 4,
        keep: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ):
        """`keep` (bool per sample) restricts the stream to a subset; `labels` (per sample) replaces the stored
        labels: together they stream confident pseudo-labels from the unlabelled set."""
        self.keep = np.ones(len(shards), dtype=bool) if keep is None else keep
        if not self.keep.any():
            raise DataError(f"{shards.root}: set {shards.name!r} has no sample to train on.")
        self.shards, self.batch_size, self.crop, self.labels = shards, batch_size, crop, labels
        self.scheme = LabelScheme(tuple(shards.label_scheme["edges"]))
        self.seed, self.rank, self.stream, self.start_step = seed, rank, int(stream), start_step
        self.kept_per_shard = np.add.reduceat(self.keep, shards.shard_starts[:-1]).astype(np.int64)
        self.shards_per_block = min(shards_per_block, int((self.kept_per_shard > 0).sum()))
        self._block_ends: list[int] = []  # cumulative sample count at the end of each block, grown on demand
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def _choose(self, j: int) -> tuple[np.random.Generator, np.ndarray]:
        """Shards of block j (distinct, weighted by size) and the generator that goes on to permute them."""
        rng = np.random.default_rng([self.seed, self.stream, self.rank, j])
        p = self.kept_per_shard / self.kept_per_shard.sum()
        return rng, rng.choice(len(p), size=self.shards_per_block, replace=False, p=p)

    def _block(self, j: int) -> np.ndarray:
        if self._cached[0] != j:  # consecutive batches mostly fall in the same block
            rng, chosen = self._choose(j)
            starts = self.shards.shard_starts
            ids = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in chosen])
            self._cached = (j, rng.permutation(ids[self.keep[ids]]))
        return self._cached[1]

    def batch_indices(self, step: int) -> np.ndarray:
        """Sample ids of batch `step`: positions [step*B, (step+1)*B) of this rank's block chain."""
        lo, hi = step * self.batch_size, (step + 1) * self.batch_size
        while not self._block_ends or self._block_ends[-1] < hi:  # block sizes need only the shard choice
            size = int(self.kept_per_shard[self._choose(len(self._block_ends))[1]].sum())
            self._block_ends.append((self._block_ends[-1] if self._block_ends else 0) + size)
        out, pos = [], lo
        while pos < hi:
            j = bisect_right(self._block_ends, pos)
            start = self._block_ends[j - 1] if j else 0
            take = min(hi, self._block_ends[j]) - pos
            out.append(self._block(j)[pos - start : pos - start + take])
            pos += take
        return np.concatenate(out)

    def make_batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, self.rank, step, 1])
        samples, damaged = [], 0
        for i in self.batch_indices(step):
            img, meta = read_image(self.shards, int(i), self.crop, rng)
            if img is None:  # an image that no longer decodes is skipped and counted, not a crash
                damaged += 1
                continue
            if self.labels is not None:
                meta["label"], meta["votes"] = int(self.labels[i]), None
            samples.append((img, meta))
        if not samples:
            raise DataError(f"{self.shards.root}: no image of a {self.shards.name} batch decodes; re-pack the shards")
        samples += samples[:damaged]  # the batch keeps its size, so every rank stays in step
        batch = collate(samples)
        probs = [self.scheme.vote_probs(m.get("votes"), m["label"]) for _, m in samples]
        batch["target"] = torch.tensor(np.stack(probs), dtype=torch.float32)  # algorithm.sup_targets: votes
        batch["step"], batch["damaged"] = torch.tensor(step), torch.tensor(damaged)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batches from workers round-robin, so worker w serves steps start+w, start+w+nw, ...
        for step in count(self.start_step + wid, nw):
            yield self.make_batch(step)


class EvalStream(IterableDataset):
    """Finite, exactly-once batches over `ids` (default: the whole set), split into contiguous ranges per
    (rank, worker). With crops > 1 each image gives `crops` fixed native-resolution windows (B, crops, 3, h, w)."""

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        crop: tuple[int, int] | None,
        rank: int,
        world_size: int,
        ids: range | None = None,
        crops: int = 1,
    ):
        if crops not in CROP_MODES:
            raise ValueError(f"crops must be one of {CROP_MODES} (0: tiles covering the whole image), got {crops}")
        self.shards, self.batch_size, self.crop, self.crops = shards, batch_size, crop, crops
        self.rank, self.world_size = rank, world_size
        self.ids = ids if ids is not None else range(len(shards))

    def slot_range(self, slot: int, num_slots: int) -> range:
        n, lo = len(self.ids), self.ids.start
        return range(lo + slot * n // num_slots, lo + (slot + 1) * n // num_slots)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        ids = self.slot_range(self.rank * nw + wid, self.world_size * nw)
        for lo in range(ids.start, ids.stop, self.batch_size):
            yield eval_batch(self.shards, range(lo, min(lo + self.batch_size, ids.stop)), self.crop, self.crops)


class ChunkStream(IterableDataset):
    """Batches over a list of id ranges (pseudo-labelling chunks), never crossing one, each tagged with its chunk's
    position. Batch j goes to worker j % num_workers, and DataLoader takes batches from workers round-robin, so
    one set of workers serves a whole job in order (a loader per chunk paid worker start-up and an empty pipeline
    per chunk: BENCHMARKS.md)."""

    def __init__(self, shards: ShardSet, chunks: list[range], batch_size: int, crop: tuple[int, int], crops: int = 1):
        self.shards, self.crop, self.crops = shards, crop, crops
        self.batches = [
            (c, range(lo, min(lo + batch_size, ids.stop)))
            for c, ids in enumerate(chunks)
            for lo in range(ids.start, ids.stop, batch_size)
        ]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for c, ids in self.batches[wid::nw]:
            yield eval_batch(self.shards, ids, self.crop, self.crops) | {"chunk": c}


CROP_MODES = (1, 5, 0)  # centre; centre + corners; 0: tiles covering the whole image (tile_crops)


def eval_batch(shards: ShardSet, ids: range, crop: tuple[int, int] | None, crops: int) -> dict[str, torch.Tensor]:
    """Fixed views of samples `ids`: the centre crop, (crops=5) centre and corners as (B, 5, 3, h, w), or (crops=0)
    every image's tiles one after another as (sum of tiles, 3, h, w) with "tiles" counting them per image."""
    samples = []
    for i in ids:
        img, meta = read_image(shards, i, crop if crops == 1 else None, None)
        if img is None:  # evaluation and pseudo-labels must cover every sample: name the image instead
            raise DataError(
                f"{shards.shards[int(shards.offsets[i][0])]}: image {meta.get('key')} no longer decodes; re-pack the "
                f"shards (pack skips and lists images that do not decode)"
            )
        samples.append((img if crops == 1 else multi_views(img, crop, crops), meta))
    batch = collate(samples, join=crops == 0)  # tiles: every image's views end to end
    if crops == 0:
        batch["tiles"] = torch.tensor([len(s[0]) for s in samples], dtype=torch.int64)
    return batch


def fixed_crops(img: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Centre and four corner windows at native resolution (the ARNIQA-style test protocol): (5, h, w, 3)."""
    ch, cw = crop
    img = decode_pad(img, crop)
    h, w = img.shape[:2]
    spots = [((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    return np.stack([img[y : y + ch, x : x + cw] for y, x in spots])


def multi_views(img: np.ndarray, crop: tuple[int, int], crops: int) -> np.ndarray:
    """The several-view modes of eval, pseudolabel and predict on a whole decoded image: centre + corners (5) or the
    tiles covering it (0), as (n, h, w, 3)."""
    return fixed_crops(img, crop) if crops == 5 else tile_crops(img, crop)


def tile_crops(img: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Windows at native resolution that cover the whole image, ceil(H/h) x ceil(W/w) of them, evenly spaced (they
    overlap where the size is not a multiple): (n, h, w, 3). Scoring averages them, so every pixel counts."""
    ch, cw = crop
    img = decode_pad(img, crop)
    h, w = img.shape[:2]
    ys = np.linspace(0, h - ch, -(-h // ch)).round().astype(int)
    xs = np.linspace(0, w - cw, -(-w // cw)).round().astype(int)
    return np.stack([img[y : y + ch, x : x + cw] for y in ys for x in xs])


def _worker_init(_: int) -> None:
    # Pillow frees and re-maps each decoded image's memory by default; caching blocks was 2.7x faster here
    # (docs/NOTES.md, Distributed training).
    Image.core.set_blocks_max(16)
    torch.set_num_threads(1)
    # Stop requests are the main process's to act on: a Ctrl-C in a terminal (or Slurm's warning signal to the
    # whole job) also reaches the workers, which would otherwise die and take the main process down before it can
    # save. SIGTERM keeps its default: it is how the loader (and Python's exit) ends workers that are still busy.
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader for either stream (batches are made in the workers). Never pass it to accelerator.prepare:
    that would re-shard or re-dispatch a stream that is already per-rank (docs/NOTES.md, Distributed training)."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=num_workers > 0 and isinstance(dataset, TrainStream),
        prefetch_factor=PREFETCH if num_workers else None,
    )
