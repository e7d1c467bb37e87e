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

import hashlib
import io
import json
import os
import signal
from bisect import bisect_right
from collections.abc import Iterator
from enum import IntEnum
from itertools import count
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslfw import fsio
from sslfw.data.images import to_rgb8
from sslfw.data.labels import LabelScheme
from sslfw.data.shards import load_index
from sslfw.errors import DataError

NPY_MAGIC = b"\x93NUMPY"  # shards packed with --pixels raw hold .npy arrays
PREFETCH = 4  # batches each loader worker keeps ready


_VERIFIED: set[tuple[str, str]] = set()  # (shard path, sha256) checked by this process


def verify_shard(path: Path, sha256: str) -> None:
    """The shard's sha256 against index.json, once per shard and process (a loader worker reads a shard whole
    once; at the embedded set's scale this was not measurable next to decoding)."""
    if (str(path), sha256) in _VERIFIED:
        return
    if fsio.sha256_file(path) != sha256:
        raise DataError(
            f"{path}: its sha256 does not match index.json (damaged or replaced since packing). Re-pack the shards, "
            f"or find the others with `sslfw shards verify {path.parent}`"
        )
    _VERIFIED.add((str(path), sha256))


class ShardSet:
    """One packed set (train/val/test/unlabelled): random access to sample i via the offsets table."""

    def __init__(self, root: str | Path, name: str):
        self.root, self.name = Path(root), name
        index = load_index(self.root)
        if name not in index["sets"]:
            raise DataError(f"{self.root}/index.json has no set {name!r}; it has {sorted(index['sets'])}.")
        info = index["sets"][name]
        self.shards = [self.root / s["name"] for s in info["shards"]]
        self.shard_counts = np.array([s["count"] for s in info["shards"]], dtype=np.int64)
        self.offsets = np.load(self.root / info["offsets"])
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_counts)])
        self.label_scheme = index["label_scheme"]
        if len(self.offsets) != info["count"]:
            raise DataError(
                f"{self.root / info['offsets']}: {len(self.offsets)} rows, index says {info['count']}. "
                f"Re-pack the shards."
            )
        for s, path in zip(info["shards"], self.shards):
            size = path.stat().st_size if path.is_file() else None
            if size != s["bytes"]:
                raise DataError(
                    f"{path}: {'missing' if size is None else f'{size} bytes'}, index.json says {s['bytes']} "
                    f"(truncated or replaced). Re-pack the shards (`sslfw shards verify {self.root}` checks them all)"
                )
        self.sha256 = [s["sha256"] for s in info["shards"]]
        self.fingerprint = hashlib.sha256(json.dumps([name, info], sort_keys=True).encode()).hexdigest()
        self._files: dict[int, object] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # file handles must not be shared across forked DataLoader workers
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            verify_shard(self.shards[shard], self.sha256[shard])
            self._files[shard] = open(self.shards[shard], "rb")
        return self._files[shard]

    def read(self, i: int) -> tuple[bytes, dict]:
        shard, img_off, img_size, js_off, js_size = (int(v) for v in self.offsets[i])
        f = self._file(shard)
        f.seek(img_off)
        data = f.read(img_size)
        return data, self._meta(f, shard, i, js_off, js_size)

    def _meta(self, f, shard: int, i: int, offset: int, size: int) -> dict:
        f.seek(offset)
        try:
            return json.loads(f.read(size))
        except ValueError:
            raise DataError(
                f"{self.shards[shard]}: sample {i} has a damaged metadata member. Re-pack the shards"
            ) from None

    def read_window(
        self, i: int, crop: tuple[int, int], rng: np.random.Generator | None
    ) -> tuple[np.ndarray, dict] | None:
        """A --pixels raw sample's crop, reading only the crop's rows from disk (the .npy header gives the shape),
        drawn exactly as decode_crop draws it; None for encoded images, for images smaller than the crop (padding)
        and for arrays that do not parse (the whole-member path then decides)."""
        shard, img_off, img_size, js_off, js_size = (int(v) for v in self.offsets[i])
        f = self._file(shard)
        f.seek(img_off)
        head = io.BytesIO(f.read(min(img_size, 256)))  # numpy writes headers of 128 bytes for these arrays
        try:
            if head.read(6) != NPY_MAGIC:
                return None
            head.seek(0)
            version = np.lib.format.read_magic(head)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(head)
        except ValueError:
            return None
        if fortran or dtype != np.uint8 or len(shape) != 3 or shape[0] < crop[0] or shape[1] < crop[1]:
            return None
        row = shape[1] * shape[2]
        if head.tell() + shape[0] * row != img_size:
            return None  # truncated or padded member: let the whole-member path report it
        y, x = _corner(shape[0], shape[1], crop, rng)
        f.seek(img_off + head.tell() + y * row)
        rows = np.frombuffer(f.read(crop[0] * row), np.uint8).reshape(crop[0], shape[1], shape[2])
        return rows[:, x : x + crop[1]], self._meta(f, shard, i, js_off, js_size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}


def decode_crop(data: bytes, crop: tuple[int, int] | None, rng: np.random.Generator | None) -> np.ndarray:
    """Decode to RGB uint8 HWC and cut a crop of (h, w) at native resolution: random with `rng`, else centred.
    An image smaller than the crop is reflect-padded rather than resized, which would change its sharpness."""
    if data[:6] == NPY_MAGIC:  # packed with --pixels raw: already RGB uint8 HWC
        return _crop_array(np.load(io.BytesIO(data), allow_pickle=False), crop, rng)
    with Image.open(io.BytesIO(data)) as im:
        im = to_rgb8(im)
        w, h = im.size
        if crop is None or h < crop[0] or w < crop[1]:
            return _crop_array(np.asarray(im), crop, rng)
        y, x = _corner(h, w, crop, rng)
        # Copy out only the window (numpy of the whole image was a quarter of the loader's time).
        return np.asarray(im.crop((x, y, x + crop[1], y + crop[0])))


def _corner(h: int, w: int, crop: tuple[int, int], rng: np.random.Generator | None) -> tuple[int, int]:
    ch, cw = crop
    if rng is None:
        return (h - ch) // 2, (w - cw) // 2
    return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))


def _crop_array(img: np.ndarray, crop: tuple[int, int] | None, rng: np.random.Generator | None) -> np.ndarray:
    if crop is None:
        return img
    img = decode_pad(img, crop)
    y, x = _corner(*img.shape[:2], crop, rng)
    return img[y : y + crop[0], x : x + crop[1]]


def decode_pad(img: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Reflect-pad an image smaller than the crop (resizing would change its sharpness)."""
    ch, cw = crop
    h, w = img.shape[:2]
    if h >= ch and w >= cw:
        return img
    return np.pad(img, ((0, max(0, ch - h)), (0, max(0, cw - w)), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")


def collate(samples: list[tuple[np.ndarray, dict]]) -> dict[str, torch.Tensor]:
    """Images to one uint8 NCHW tensor; labels, indices and MOS (NaN where unknown) to vectors."""
    # NCHW view of NHWC memory: the transposing copy is left to the device (consumers index or .float() it).
    images = torch.from_numpy(np.stack([s[0] for s in samples])).movedim(-1, -3)
    metas = [s[1] for s in samples]
    return {
        "image": images,
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
    if crops != 0:
        return collate(samples)
    batch = collate([(views[0], meta) for views, meta in samples])  # labels, keys, indices as for the other modes
    batch["image"] = torch.from_numpy(np.concatenate([s[0] for s in samples])).movedim(-1, -3)
    batch["tiles"] = torch.tensor([len(s[0]) for s in samples], dtype=torch.int64)
    return batch


def read_image(shards: ShardSet, i: int, crop: tuple[int, int] | None, rng: np.random.Generator | None):
    """(decoded crop or None when the image bytes no longer decode, metadata) of sample i."""
    window = shards.read_window(i, crop, rng) if crop is not None else None
    if window is not None:  # raw pixels: only the crop's rows were read
        return window
    data, meta = shards.read(i)
    try:
        return decode_crop(data, crop, rng), meta
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # Pillow's ways of saying "damaged"
        return None, meta


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
