"""Full-reference quality of a distorted crop against its clean crop: the hidden truth of the embedded dataset.

The score must be something a blind model can read off the distorted image alone, so it is built from what the
distortion does to the picture: gradient structure (GMSD, Xue et al. 2014), chroma (MDSI-style opponent channels,
Nafchi et al. 2016) and local luminance (the SSIM luminance term). The first two gave rho(level, -score) = 0.76
(docs/NOTES.md, Datasets); the luminance term adds sensitivity to brightness changes, which GMSD barely sees.
Inputs are float32 RGB in [0, 1]; everything is computed on the 0..255 scale the published constants assume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_PREWITT = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], dtype=np.float32) / 3.0


def _luma255(img: np.ndarray) -> np.ndarray:
    return (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) * 255.0


def _down2(y: np.ndarray) -> np.ndarray:
    """2x average-pool, as GMSD does before the gradients."""
    h, w = (y.shape[0] // 2) * 2, (y.shape[1] // 2) * 2
    return y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _grad_mag(y: np.ndarray) -> np.ndarray:
    gx = ndimage.convolve(y, _PREWITT, mode="nearest")
    gy = ndimage.convolve(y, _PREWITT.T, mode="nearest")
    return np.sqrt(gx * gx + gy * gy)


def gmsd(ref: np.ndarray, dist: np.ndarray, c: float = 170.0) -> float:
    """Gradient magnitude similarity deviation: 0 for identical images, larger is worse."""
    gr, gd = _grad_mag(_down2(_luma255(ref))), _grad_mag(_down2(_luma255(dist)))
    gms = (2 * gr * gd + c) / (gr * gr + gd * gd + c)
    return float(gms.std())


def chroma_similarity(ref: np.ndarray, dist: np.ndarray, c: float = 550.0) -> float:
    """Mean similarity of the H/M opponent chroma channels: 1 for identical chroma."""
    mix = np.array([[0.30, 0.34], [0.04, -0.60], [-0.35, 0.17]], dtype=np.float32)
    hr, hd = (ref * 255.0) @ mix, (dist * 255.0) @ mix
    num = 2 * (hr * hd).sum(-1) + c
    den = (hr * hr).sum(-1) + (hd * hd).sum(-1) + c
    return float((num / den).mean())


def luminance_similarity(ref: np.ndarray, dist: np.ndarray, c: float = 6.5, window: int = 8) -> float:
    """Mean SSIM luminance term over local windows: 1 when local brightness is unchanged."""
    mr = ndimage.uniform_filter(_luma255(ref), window, mode="reflect")
    md = ndimage.uniform_filter(_luma255(dist), window, mode="reflect")
    return float(((2 * mr * md + c) / (mr * mr + md * md + c)).mean())


def fr_quality(ref: np.ndarray, dist: np.ndarray) -> float:
    """Combined full-reference quality in [0, 1]; 1 means indistinguishable from the reference."""
    structure = 1.0 - min(gmsd(ref, dist) / 0.3, 1.0)
    return structure * chroma_similarity(ref, dist) ** 4 * luminance_similarity(ref, dist) ** 4


# Monotone map from fr_quality to true MOS on KonIQ's 1..5 scale. The knots are quantiles of fr_quality over the
# default embedded mixture (`sslfw data synth --calibrate`), matched to KonIQ-10k's MOS distribution: 2 % below 1.79,
# 15 % below 2.55, 64 % below 3.46, 98 % below 3.94 (docs/NOTES.md, Labels). The top 2 % are the flawless shots
# (synth.capture: no defocus, noise or over-exposure, no distortion), so level 4 has a visible cause.
# They are constants, so an image's score never depends on which other images were generated with it.
MOS_KNOTS_Q = (0.0, 0.019, 0.1308, 0.2871, 0.4965, 0.9763, 1.0)
MOS_KNOTS_MOS = (1.10, 1.79, 2.55, 3.05, 3.46, 3.94, 4.31)
CALIBRATION_QUANTILES = (0.0, 0.02, 0.15, 0.40, 0.64, 0.98, 1.0)


def quality_to_mos(q: float | np.ndarray) -> np.ndarray:
    return np.interp(q, MOS_KNOTS_Q, MOS_KNOTS_MOS)
