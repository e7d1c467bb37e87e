"""Pixel modes: every image sslfw reads becomes RGB with 8 bits per channel, the same way in pack and loader."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb8(im: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. Pillow's own convert("RGB") clips 16-bit and integer images at 255 (a 16-bit
    PNG turns white) and floats to garbage, so those modes are scaled: 16-bit and 32-bit integers by their range
    (x / 257 for 0..65535), floats from [0, 1] (or [0, 255] when larger values occur)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            scale = 255.0 if np.nanmax(a, initial=0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or np.max(a, initial=0) > 255 else 1.0
        a = np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")
