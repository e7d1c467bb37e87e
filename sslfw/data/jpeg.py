"""JPEG crops decoded on the model's device (`data.jpeg_on_device`): nvJPEG on a GPU, libjpeg-turbo on a CPU.

Loader workers then only read the header, draw the crop's corner exactly as the decoding path draws it, and send
the encoded bytes (a tenth of the pixels' size for KonIQ's JPEGs); `images_on` decodes a batch's files in one call
on the device and cuts the crops there. On a CPU the pixels are the workers' own (both are libjpeg-turbo: a test
checks equality); nvJPEG's IDCT may differ by a level or two. What cannot be decoded there stays in the workers: PNG
and raw-pixel shards (KADIS's pool is PNG), CMYK JPEGs, images smaller than the crop (reflect padding), and the
several-view eval modes, which need the whole image. Decoding goes through TorchCodec (torchvision's image decoders
are deprecated since 0.29 in its favour); its pixels equal libjpeg-turbo's in the workers (a test checks).
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchcodec.decoders import decode_jpeg

from sslfw.errors import DataError

JPEG_MAGIC = b"\xff\xd8\xff"


class DeferredJpeg(NamedTuple):
    """An encoded JPEG and the (h, w) crop at (y, x) to cut from it once it is decoded."""

    data: bytes
    y: int
    x: int
    h: int
    w: int


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device can decode to RGB (colour or grey), from its header; else None."""
    if data[:3] != JPEG_MAGIC:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            if im.mode not in ("RGB", "L"):
                return None
            return im.size[1], im.size[0]
    except (OSError, ValueError, SyntaxError):
        return None  # the decoding path reports it as damaged


def split_deferred(images: list) -> tuple[list[np.ndarray], dict[str, torch.Tensor]]:
    """Blank placeholders for the deferred crops (filled in by `images_on`) and the batch entries that carry them:
    their bytes end to end in one tensor (one shared-memory segment per batch, not one per image) and a (k, 5)
    table of slot, corner, start and length (the crop size is the batch's)."""
    deferred = [(slot, d) for slot, d in enumerate(images) if isinstance(d, DeferredJpeg)]
    if not deferred:
        return images, {}
    pixels = [np.zeros((d.h, d.w, 3), np.uint8) if isinstance(d, DeferredJpeg) else d for d in images]
    lengths = [len(d.data) for _, d in deferred]
    starts = np.cumsum([0, *lengths[:-1]])
    table = [[slot, d.y, d.x, int(s), n] for (slot, d), s, n in zip(deferred, starts, lengths)]
    return pixels, {
        "jpeg": torch.frombuffer(bytearray(b"".join(d.data for _, d in deferred)), dtype=torch.uint8),
        "jpeg_at": torch.tensor(table, dtype=torch.int64),
    }


def join_deferred(first: dict, second: dict) -> dict[str, torch.Tensor]:
    """The deferred entries of two batches whose images are concatenated (first's, then second's)."""
    parts = [b for b in (first, second) if "jpeg" in b]
    if not parts:
        return {}
    tables = [b["jpeg_at"].clone() for b in parts]
    if "jpeg" in second:  # second's slots and byte offsets move past first's
        tables[-1][:, 0] += len(first["image"])
        tables[-1][:, 3] += len(first["jpeg"]) if "jpeg" in first else 0
    return {"jpeg": torch.cat([b["jpeg"] for b in parts]), "jpeg_at": torch.cat(tables)}


def images_on(batch: dict, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """The batch's uint8 NCHW images on `device`, with the crops the loader left encoded decoded there."""
    images = batch["image"].to(device, non_blocking=non_blocking)
    if "jpeg" not in batch:
        return images
    table = batch["jpeg_at"].tolist()  # a CPU tensor from the loader: no device sync
    blobs = [batch["jpeg"][start : start + n] for *_, start, n in table]
    try:
        decoded = decode_jpeg(blobs, mode="RGB", device=device)
    except RuntimeError as e:
        keys = [batch["key"][row[0]] for row in table]
        raise DataError(f"JPEG decoding on {device} failed for one of {keys}: {e}; re-pack the shards") from None
    h, w = images.shape[-2:]
    for (slot, y, x, _, _), img in zip(table, decoded):
        images[slot] = img[:, y : y + h, x : x + w]
    return images
