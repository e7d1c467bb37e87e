"""`sslfw shards pack`: manifest -> WebDataset tar shards + index.json.

Shards are plain WebDataset tars (`{key}.jpg|png` holding the original file bytes, `{key}.json` the metadata), so
`webdataset.WebDataset` and `tar` read them. Next to each set sslfw writes an offsets table, so any rank or worker
can seek straight to any sample: that is what makes the training stream exactly resumable and the evaluation stream
exactly-once with any number of shards, ranks and workers (stream.py).

Rows are shuffled once, with a fixed seed, before they are cut into shards, so every shard is an i.i.d. slice.
Image bytes are stored as they are (re-encoding would change the quality the MOS describes) unless --max-side asks
for a resize. `--pixels raw` stores the decoded RGB pixels instead (`{key}.npy`): the same pixels, lossless, with no
decoding left for the loader, which is what keeps a GPU fed when CPU cores cannot decode PNGs fast enough
(BENCHMARKS.md); it costs disk (3x a PNG, 5x a JPEG here). `--pixels zstd` stores the same pixels in zstd blocks of
rows (`{key}.zpx`, sslfw/data/zpix.py): about 1.5x a PNG's size, decoded ~10x faster, and a crop decompresses only
the blocks it covers. An image that fails to decode is skipped, counted and
listed in index.json, never a crash.
index.json is written last and marks a complete pack.
"""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import tarfile
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from sslfw import fsio
from sslfw.data import manifest as mf
from sslfw.data import zpix
from sslfw.data.images import to_rgb8
from sslfw.data.labels import NUM_CLASSES
from sslfw.errors import DataError
from sslfw.logger import progress_bar

INDEX = "index.json"
FORMAT = "sslfw-shards/1"
SETS = ("train", "val", "test", "unlabelled")
# Columns of {set}.offsets.npy: where each sample's image and json members start in its shard.
OFFSET_COLUMNS = ("shard", "image_offset", "image_size", "json_offset", "json_size")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


PIXELS = ("original", "raw", "zstd")  # the file's bytes; decoded RGB as .npy; decoded RGB in zstd row blocks


def check_image(path: str, max_side: int | None, pixels: str = "original") -> tuple[bytes | None, str, str]:
    """(bytes to store, extension, error). Decodes fully, so truncated or corrupt files are caught here."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format or ""
            if pixels == "raw":  # what the loader would decode (RGB uint8 HWC), stored as .npy
                buf = io.BytesIO()
                np.save(buf, np.asarray(to_rgb8(im)), allow_pickle=False)
                return buf.getvalue(), "npy", ""
            if pixels == "zstd":  # the same pixels, lossless, in zstd row blocks (sslfw/data/zpix.py)
                return zpix.encode(np.asarray(to_rgb8(im))), "zpx", ""
            if max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                im = to_rgb8(im).resize(
                    (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS
                )
                buf = io.BytesIO()
                im.save(buf, format="JPEG" if fmt == "JPEG" else "PNG", **({"quality": 95} if fmt == "JPEG" else {}))
                data, fmt = buf.getvalue(), fmt if fmt == "JPEG" else "PNG"
        if fmt not in _EXT:
            return None, "", f"unsupported image format {fmt or 'unknown'}"
        return data, _EXT[fmt], ""
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this image", reported below
        return None, "", f"{type(e).__name__}: {e}"


def _check_star(args: tuple[str, int | None, str]) -> tuple[bytes | None, str, str]:
    return check_image(*args)


def _sample_meta(row: mf.LabelledRow | None, key: str, set_name: str, idx: int, gidx: int) -> dict:
    meta = {"key": key, "set": set_name, "idx": idx, "gidx": gidx, "label": -1}
    if row is not None:
        meta |= {
            "label": row.label,
            "source": row.source,
            "mos": None if math.isnan(row.mos) else row.mos,
            "mos_zscore": None if math.isnan(row.mos_zscore) else row.mos_zscore,
            "votes": row.votes or None,
        }
    return meta


class _ShardRoller:
    """Writes samples into `{set}-NNNNNN.tar`, each built under a temporary name and renamed when full."""

    def __init__(self, out: Path, set_name: str, per_shard: int):
        self.out, self.set_name, self.per_shard = out, set_name, per_shard
        self.shards: list[dict] = []
        self.offsets: list[tuple[int, ...]] = []
        self._file = self._writer = None
        self._count = 0
        self._classes = np.zeros(NUM_CLASSES, dtype=int)

    def write(self, key: str, ext: str, data: bytes, meta: dict) -> None:
        if self._writer is None:
            name = f"{self.set_name}-{len(self.shards):06d}.tar"
            self._path = self.out / name
            self._tmp = self.out / f".{name}.tmp"
            self._file = open(self._tmp, "wb")
            self._writer = wds.TarWriter(self._file, mtime=0, encoder=False)  # fixed mtime: byte-reproducible
        self._writer.write({"__key__": key, ext: data, "json": json.dumps(meta, sort_keys=True).encode()})
        self._count += 1
        if meta["label"] >= 0:
            self._classes[meta["label"]] += 1
        if self._count == self.per_shard:
            self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._path)
        shard_no = len(self.shards)
        with tarfile.open(self._path) as tf:  # record where each member's bytes start, for random access
            members = tf.getmembers()
        for pair in zip(members[0::2], members[1::2]):  # the writer orders a sample's members by name
            js, img = sorted(pair, key=lambda m: not m.name.endswith(".json"))
            self.offsets.append((shard_no, img.offset_data, img.size, js.offset_data, js.size))
        self.shards.append(
            {
                "name": self._path.name,
                "count": self._count,
                "class_counts": self._classes.tolist(),
                "sha256": fsio.sha256_file(self._path),
                "bytes": self._path.stat().st_size,
            }
        )
        self._writer = self._file = None
        self._count = 0
        self._classes = np.zeros(NUM_CLASSES, dtype=int)


def _check_pixels(pixels: str, max_side: int | None) -> None:
    if pixels not in PIXELS:
        raise DataError(
            f"--pixels {pixels!r}: choose original (the file bytes), raw (decoded RGB, .npy) or zstd (decoded RGB, "
            f"zstd row blocks)"
        )
    if pixels != "original" and max_side:
        raise DataError(
            f"--pixels {pixels} cannot be combined with --max-side (it would store resized pixels as if "
            "they were original); pack with one or the other"
        )


def pack(
    manifest: Path,
    out: Path,
    samples_per_shard: int = 256,
    max_side: int | None = None,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
    pixels: str = "original",
) -> dict:
    """Pack every set of the manifest; returns the index (also written to out/index.json)."""
    _check_pixels(pixels, max_side)
    labelled, pool, meta = mf.load(manifest)
    members: dict[str, list[tuple[str, str, mf.LabelledRow | None]]] = {s: [] for s in SETS}
    for r in labelled:
        members[r.split].append((r.key, r.path, r))
    members["unlabelled"] = [(k, p, None) for k, p in pool]

    index = {
        "format": FORMAT,
        "label_scheme": meta["label_scheme"],
        "split": meta["split"],
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "max_side": max_side,
        "pixels": pixels,
        "sets": {},
        "skipped": [],
    }
    # Written into a staged folder that replaces OUT only when complete: a failed pack leaves the old one intact.
    with fsio.staged_dir(out, _pack_files(Path(out)).__contains__) as out:
        total = sum(len(v) for v in members.values())
        bar = progress_bar(total=total, desc="packing", unit="img", show=progress)
        n_workers = workers or os.cpu_count() or 1
        pool_ctx = get_context("spawn").Pool(n_workers) if n_workers > 1 and total >= 256 else None
        gidx = 0
        try:
            for set_id, set_name in enumerate(SETS):
                rng = np.random.default_rng([seed, set_id])
                rows = [members[set_name][i] for i in rng.permutation(len(members[set_name]))]
                jobs = [(p, max_side, pixels) for _, p, _ in rows]
                results = pool_ctx.imap(_check_star, jobs, chunksize=8) if pool_ctx else map(_check_star, jobs)
                index["sets"][set_name] = _pack_set(out, set_name, rows, results, samples_per_shard, gidx, index, bar)
                gidx += index["sets"][set_name]["count"]
        finally:
            bar.close()
            if pool_ctx:
                pool_ctx.close()
                pool_ctx.join()
        fsio.write_json(out / INDEX, index)  # last: a folder with index.json is a complete pack

    return index


def _pack_set(
    out: Path, set_name: str, rows: list, results, samples_per_shard: int, start: int, index: dict, bar
) -> dict:
    """One set's shards and offsets table from its (key, path, row) members in packing order; images that do not
    decode are listed in index["skipped"]. Sample indices run on from `start` across sets."""
    roller = _ShardRoller(out, set_name, samples_per_shard)
    gidx = start
    for (key, path, row), (data, ext, err) in zip(rows, results):
        bar.update()
        if data is None:
            index["skipped"].append({"set": set_name, "key": key, "path": path, "error": err})
            continue
        roller.write(key, ext, data, _sample_meta(row, key, set_name, gidx - start, gidx))
        gidx += 1
    roller.close()
    table = np.array(roller.offsets, dtype=np.int64).reshape(-1, len(OFFSET_COLUMNS))
    with fsio.atomic_open(out / f"{set_name}.offsets.npy") as f:
        np.save(f, table)
    counts = np.array([s["class_counts"] for s in roller.shards]).reshape(-1, NUM_CLASSES).sum(0)
    return {"count": len(table), "gidx_offset": start, "class_counts": counts.tolist(),
            "offsets": f"{set_name}.offsets.npy", "shards": roller.shards}  # fmt: skip


def _pack_files(root: Path) -> set[str]:
    """The names an earlier pack wrote into `root`, as its index.json lists them: a tar the index does not name
    is a user's file, and a folder holding one is refused rather than replaced."""
    try:
        index = json.loads((root / INDEX).read_text())
        sets = index["sets"].values()
        return {INDEX} | {s["offsets"] for s in sets} | {shard["name"] for s in sets for shard in s["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # no (readable) pack here: nothing in the folder is ours


def load_index(root: Path) -> dict:
    path = Path(root) / INDEX
    repack = f"sslfw shards pack --out {shlex.quote(str(root))}"
    if not path.is_file():
        raise DataError(f"{root}: no {INDEX}, so this is not a complete pack. Run `{repack}`.")
    index = fsio.read_json(path, f"re-pack with `{repack}`")
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT:
        raise DataError(f"{path}: format {found!r}, expected {FORMAT!r}. Re-pack with this sslfw.")
    return index


def identity(index: dict) -> dict:
    """What a run trained on, recorded with its checkpoints: the pack's fingerprint (every shard's sha256), the split's
    hash and the label scheme. Another pack in the same folder, another split or other --bins differ here."""
    shards = {name: [s["sha256"] for s in info["shards"]] for name, info in sorted(index["sets"].items())}
    return {
        "fingerprint": fsio.sha256_text(json.dumps(shards, sort_keys=True)),
        "split_sha256": index["split"]["sha256"],
        "label_edges": list(index["label_scheme"]["edges"]),
    }


def identity_mismatch(recorded: dict, current: dict) -> str | None:
    """'key: recorded -> current; ...' for what differs (None when the same data, or nothing was recorded)."""
    diff = [
        f"{k}: {str(recorded[k])[:16]} -> {str(current.get(k))[:16]}" for k in recorded if recorded[k] != current.get(k)
    ]
    return "; ".join(diff) or None


def verify(root: Path) -> dict:
    """Check every shard of a pack against index.json (size and sha256) and every offsets table against its set;
    a summary, or one DataError naming each damaged file."""
    root = Path(root)
    index = load_index(root)
    bad, shards, size = [], 0, 0
    for info in index["sets"].values():
        for s in info["shards"]:
            path = root / s["name"]
            shards += 1
            if not path.is_file():
                bad.append(f"{path.name} (missing)")
                continue
            size += path.stat().st_size
            if path.stat().st_size != s["bytes"]:
                bad.append(f"{path.name} ({path.stat().st_size} bytes, index.json says {s['bytes']})")
            elif fsio.sha256_file(path) != s["sha256"]:
                bad.append(f"{path.name} (sha256 differs)")
        table = root / info["offsets"]
        try:
            rows = len(np.load(table, allow_pickle=False))
        except (OSError, ValueError):
            rows = None
        if rows != info["count"]:
            bad.append(f"{table.name} ({'unreadable' if rows is None else f'{rows} rows'}, expected {info['count']})")
    if bad:
        raise DataError(f"{root}: {len(bad)} damaged file(s): {'; '.join(bad)}. Re-pack with `sslfw shards pack`")
    return {"shards": shards, "bytes": size, "sets": {n: s["count"] for n, s in index["sets"].items()}, "ok": True}
