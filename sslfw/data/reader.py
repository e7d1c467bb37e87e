"""Random access to one packed set and decoding of one sample: what every stream, the reference features and
predict read images with.

`ShardSet` seeks to offsets recorded at pack time and checks each shard's sha256 once per process. Images are
decoded with PIL, or read as raw pixels (`--pixels raw` shards hold .npy arrays, `--pixels zstd` ones zstd blocks of
rows; a crop of either reads only its rows), and cut at native resolution: random with a generator, else centred;
an image smaller than the crop is reflect-padded, never resized (resizing changes perceived quality).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from sslfw import fsio
from sslfw.data import zpix
from sslfw.data.images import to_rgb8
from sslfw.data.jpeg import DeferredJpeg, header_size
from sslfw.data.shards import load_index
from sslfw.errors import DataError

NPY_MAGIC = b"\x93NUMPY"  # shards packed with --pixels raw hold .npy arrays

_VERIFIED: set[tuple[str, str]] = set()  # (shard path, sha256) checked by this process


def verify_shard(path: Path, sha256: str) -> None:
    """The shard's sha256 against index.json, once per shard and process (a loader worker reads a shard whole
    once; at the embedded set's scale this was not measurable next to decoding)."""
    if (str(path), sha256) in _VERIFIED:
        return
    if fsio.sha256_file(path) != sha256:
        raise DataError(
            f"{path}: its sha256 does not match index.json (damaged or replaced since packing). Re-pack the shards, "
            f"or find the others with `sslfw shards verify {shlex.quote(str(path.parent))}`"
        )
    _VERIFIED.add((str(path), sha256))


class ShardSet:
    """One packed set (train/val/test/unlabelled): random access to sample i via the offsets table."""

    def __init__(self, root: str | Path, name: str, jpeg_on_device: bool = False):
        """`jpeg_on_device`: single crops of JPEGs are left encoded for the model's device (sslfw/data/jpeg.py)."""
        self.root, self.name, self.jpeg_on_device = Path(root), name, jpeg_on_device
        index = load_index(self.root)
        if name not in index["sets"]:
            raise DataError(f"{self.root}/index.json has no set {name!r}; it has {sorted(index['sets'])}.")
        info = index["sets"][name]
        self.shards = [self.root / s["name"] for s in info["shards"]]
        self.shard_counts = np.array([s["count"] for s in info["shards"]], dtype=np.int64)
        self.offsets = np.load(self.root / info["offsets"])
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_counts)])
        self.label_scheme = index["label_scheme"]
        self.pixels = index.get("pixels", "raw")  # original (the files' bytes), raw or zstd
        self.raw = self.pixels in ("raw", "zstd")  # shards whose crops read only their rows
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
                    f"(truncated or replaced). Re-pack the shards (`sslfw shards verify {shlex.quote(str(self.root))}`)"
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

    def meta(self, i: int) -> dict:
        """Sample i's metadata (key, label, MOS...) without reading its pixels."""
        shard, _, _, js_off, js_size = (int(v) for v in self.offsets[i])
        return self._meta(self._file(shard), shard, i, js_off, js_size)

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
        head = f.read(min(img_size, 256))  # numpy writes headers of 128 bytes for these arrays
        if (z := zpix.header(head)) is not None:  # --pixels zstd: decompress only the blocks holding the rows
            if z[0] < crop[0] or z[1] < crop[1]:
                return None
            y, x = _corner(z[0], z[1], crop, rng)

            def read(offset: int, size: int) -> bytes:
                f.seek(img_off + offset)
                return f.read(size)

            return zpix.read_rows(read, z, y, crop[0])[:, x : x + crop[1]], self._meta(f, shard, i, js_off, js_size)
        parsed = _npy_header(head)
        if parsed is None:
            return None
        shape, fortran, dtype, header_len = parsed
        if fortran or dtype != np.uint8 or len(shape) != 3 or shape[0] < crop[0] or shape[1] < crop[1]:
            return None
        row = shape[1] * shape[2]
        if header_len + shape[0] * row != img_size:
            return None  # truncated or padded member: let the whole-member path report it
        y, x = _corner(shape[0], shape[1], crop, rng)
        f.seek(img_off + header_len + y * row)
        rows = np.frombuffer(f.read(crop[0] * row), np.uint8).reshape(crop[0], shape[1], shape[2])
        return rows[:, x : x + crop[1]], self._meta(f, shard, i, js_off, js_size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}


_HEADERS: dict[bytes, tuple | None] = {}  # .npy header bytes -> parsed; a pool's images share a few shapes


def _npy_header(head: bytes) -> tuple[tuple, bool, np.dtype, int] | None:
    """(shape, fortran order, dtype, header length) of the .npy member starting with `head`, or None. Parsed once
    per distinct header: numpy's parser (a literal_eval) was a tenth of a raw crop's read time."""
    if head[:6] != NPY_MAGIC or len(head) < 12:
        return None
    size_bytes = 2 if head[6] == 1 else 4  # format 1.0: 2-byte header length; 2.0 and 3.0: 4 bytes
    end = 8 + size_bytes + int.from_bytes(head[8 : 8 + size_bytes], "little")
    key = head[:end]
    if key not in _HEADERS:
        if len(_HEADERS) >= 4096:  # images of many sizes: bound the cache
            _HEADERS.clear()
        stream = io.BytesIO(key)
        try:
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _HEADERS[key] = (*read(stream), end) if len(key) == end else None
        except ValueError:
            _HEADERS[key] = None
    return _HEADERS[key]


def decode_crop(data: bytes, crop: tuple[int, int] | None, rng: np.random.Generator | None) -> np.ndarray:
    """Decode to RGB uint8 HWC and cut a crop of (h, w) at native resolution: random with `rng`, else centred.
    An image smaller than the crop is reflect-padded rather than resized, which would change its sharpness."""
    if data[:6] == NPY_MAGIC:  # packed with --pixels raw: already RGB uint8 HWC
        return _crop_array(np.load(io.BytesIO(data), allow_pickle=False), crop, rng)
    if data[:5] == zpix.MAGIC:  # packed with --pixels zstd
        return _crop_array(zpix.decode(data), crop, rng)
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


def read_image(shards: ShardSet, i: int, crop: tuple[int, int] | None, rng: np.random.Generator | None):
    """(decoded crop, or a DeferredJpeg for the device to decode, or None when the image bytes no longer decode;
    metadata) of sample i."""
    window = shards.read_window(i, crop, rng) if crop is not None and shards.raw else None
    if window is not None:  # raw pixels: only the crop's rows were read
        return window
    data, meta = shards.read(i)
    size = header_size(data) if shards.jpeg_on_device and crop is not None else None
    if size is not None and size[0] >= crop[0] and size[1] >= crop[1]:  # the same draw as decode_crop's
        return DeferredJpeg(data, *_corner(*size, crop, rng), *crop), meta
    try:
        return decode_crop(data, crop, rng), meta
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # Pillow's ways of saying "damaged"
        return None, meta
