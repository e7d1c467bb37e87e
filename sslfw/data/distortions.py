"""KADID-style synthetic distortions at 5 levels, used to build the embedded dataset.

Codes follow the KADID-10k/KADIS-700k numbering (docs/NOTES.md, Datasets) so the synthetic KADIS csv means what the
real one does. Parameters are our own, chosen for small images (the embedded set is ~128 px, KADID is 512 px).
All functions take and return float32 RGB arrays in [0, 1] of shape (H, W, 3).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

Distortion = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    kernel = (kernel / kernel.sum()).astype(np.float32)
    return np.stack([ndimage.convolve(img[..., c], kernel, mode="reflect") for c in range(3)], axis=-1)


def gaussian_blur(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.5, 0.9, 1.4, 2.2, 3.5)[level - 1]
    return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")


def lens_blur(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    r = (1, 1.5, 2, 3, 4.5)[level - 1]
    n = int(np.ceil(r))
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    return _convolve(img, (xx**2 + yy**2 <= r * r).astype(np.float32))


def motion_blur(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    length = (2, 3, 5, 7, 10)[level - 1]
    angle = rng.uniform(0, np.pi)
    size = length | 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    for t in np.linspace(-length / 2, length / 2, 4 * length):
        kernel[int(round(c + t * np.sin(angle))), int(round(c + t * np.cos(angle)))] = 1.0
    return _convolve(img, kernel)


def desaturate(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.6, 0.4, 0.2, 0.0, -0.4)[level - 1]
    gray = _luma(img)[..., None]
    return np.clip(gray + factor * (img - gray), 0, 1)


def oversaturate(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    factor = (1.5, 2.0, 2.7, 3.6, 5.0)[level - 1]
    gray = _luma(img)[..., None]
    return np.clip(gray + factor * (img - gray), 0, 1)


def jpeg(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    quality = (43, 30, 18, 9, 4)[level - 1]
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0


def white_noise(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    var = (0.0005, 0.001, 0.002, 0.004, 0.008)[level - 1]
    return np.clip(img + rng.normal(0, np.sqrt(var), img.shape).astype(np.float32), 0, 1)


def impulse_noise(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    density = (0.003, 0.008, 0.015, 0.03, 0.06)[level - 1]
    out = img.copy()
    hit = rng.random(img.shape[:2]) < density
    out[hit] = rng.integers(0, 2, size=(int(hit.sum()), 1)).astype(np.float32)
    return out


def multiplicative_noise(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    var = (0.002, 0.005, 0.01, 0.02, 0.05)[level - 1]
    return np.clip(img * (1 + rng.normal(0, np.sqrt(var), img.shape).astype(np.float32)), 0, 1)


def brighten(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    gamma = (0.8, 0.65, 0.5, 0.38, 0.28)[level - 1]
    return img ** np.float32(gamma)


def darken(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    gamma = (1.3, 1.6, 2.0, 2.6, 3.4)[level - 1]
    return img ** np.float32(gamma)


def pixelate(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    scale = (0.7, 0.5, 0.35, 0.25, 0.15)[level - 1]
    h, w = img.shape[:2]
    small = Image.fromarray(to_uint8(img)).resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST), dtype=np.float32) / 255.0


def quantize(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    levels = (20, 14, 10, 7, 4)[level - 1]
    return np.round(img * (levels - 1)) / (levels - 1)


def sharpen(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    amount = (1.0, 2.0, 3.0, 5.0, 8.0)[level - 1]
    blurred = ndimage.gaussian_filter(img, sigma=(1.0, 1.0, 0), mode="reflect")
    return np.clip(img + amount * (img - blurred), 0, 1)


def contrast(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.75, 1.5, 0.5, 2.0, 0.3)[level - 1]
    mean = _luma(img).mean()
    return np.clip(mean + factor * (img - mean), 0, 1)


# KADID code -> distortion. 15 (denoise) and 20/23 (patch artefacts) are left out, as in the Python ports.
DISTORTIONS: dict[int, Distortion] = {
    1: gaussian_blur,
    2: lens_blur,
    3: motion_blur,
    7: desaturate,
    8: oversaturate,
    10: jpeg,
    11: white_noise,
    13: impulse_noise,
    14: multiplicative_noise,
    16: brighten,
    17: darken,
    21: pixelate,
    22: quantize,
    24: sharpen,
    25: contrast,
}


# The embedded dataset's default mix: structural distortions (blur, noise, compression, resampling, sharpening).
# Global tone and colour changes (7, 8, 16, 17, 25) are left out by default: on content of unknown colour and
# exposure (dead-leaves, random crops) no blind model can tell them from the original, so they would add label
# noise rather than signal. `sslfw data synth --distortions` can put them back.
DEFAULT_MIX = (1, 2, 3, 10, 11, 13, 14, 21, 22, 24)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def distort(img: np.ndarray, code: int, level: int, rng: np.random.Generator) -> np.ndarray:
    """Apply KADID distortion `code` at `level` (1 mild .. 5 severe); code 0 is the identity (pristine)."""
    if code == 0:
        return img
    if not 1 <= level <= 5:
        raise ValueError(f"distortion level must be 1..5, got {level}")
    return DISTORTIONS[code](img, level, rng).astype(np.float32)
