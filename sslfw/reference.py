"""A classical no-reference baseline beside every report: hand-made quality features + ridge regression.

It answers "what does a model that is not a network reach on these labels?": the floor is the constant guess,
this is a classical ceiling a network should beat. Features (numpy/scipy only, nothing downloads) follow the
standard no-reference cues: sharpness (Laplacian and gradient energy), noise (median absolute deviation of a
high-pass residual), JPEG blockiness (8x8 boundary against interior differences), exposure and contrast
(luminance statistics), colourfulness (Hasler and Suesstrunk) and natural-scene statistics of mean-subtracted
contrast-normalised coefficients at two scales (BRISQUE-style moments and neighbour products). A ridge regression
on the standardised features and their squares predicts MOS; its strength is chosen on the validation split.
"""

from __future__ import annotations

import os
from multiprocessing import get_context

import numpy as np
from scipy import ndimage, stats

from sslfw.data.labels import LabelScheme
from sslfw.data.reader import ShardSet, read_image

ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
CHUNK = 64  # images per worker task


def _mscn(lum: np.ndarray) -> np.ndarray:
    mu = ndimage.gaussian_filter(lum, 7 / 6)
    sigma = np.sqrt(np.abs(ndimage.gaussian_filter(lum * lum, 7 / 6) - mu * mu))
    return (lum - mu) / (sigma + 1.0)


def _nss(lum: np.ndarray) -> list[float]:
    m = _mscn(lum)
    out = [float(m.var()), float(stats.skew(m.ravel())), float(stats.kurtosis(m.ravel()))]
    for shifted in (m[:, 1:] * m[:, :-1], m[1:, :] * m[:-1, :], m[1:, 1:] * m[:-1, :-1], m[1:, :-1] * m[:-1, 1:]):
        out += [float(shifted.mean()), float(shifted.var())]
    return out


def features(img: np.ndarray) -> np.ndarray:
    """About 40 no-reference quality features of one RGB uint8 image (HWC)."""
    rgb = img.astype(np.float64)
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    lap = ndimage.laplace(lum)
    gx, gy = ndimage.sobel(lum, 1), ndimage.sobel(lum, 0)
    grad = np.hypot(gx, gy)
    resid = lum - ndimage.median_filter(lum, 3)
    noise = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    h, w = lum.shape
    col = np.abs(np.diff(lum, axis=1))
    row = np.abs(np.diff(lum, axis=0))
    edge_c = col[:, 7::8].mean() if w > 8 else 0.0
    edge_r = row[7::8, :].mean() if h > 8 else 0.0
    block = (edge_c + edge_r) / (col.mean() + row.mean() + 1e-6)
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourful = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    sat = (rgb.max(-1) - rgb.min(-1)) / (rgb.max(-1) + 1e-6)
    cues = [
        np.log1p(lap.var()), np.log1p(np.abs(lap).mean()), np.log1p(grad.mean()), np.log1p(grad.std()),
        float(np.percentile(grad, 90)) / 255, np.log1p(noise), block,
        lum.mean() / 255, lum.std() / 255, float(np.percentile(lum, 5)) / 255, float(np.percentile(lum, 95)) / 255,
        float((lum < 10).mean()), float((lum > 245).mean()), colourful / 255, sat.mean(), sat.std(),
    ]  # fmt: skip
    half = ndimage.zoom(lum, 0.5, order=1)
    return np.array(cues + _nss(lum) + _nss(half), dtype=np.float64)


def _chunk_features(root: str, name: str, indices: range) -> tuple[list, list, list, list]:
    """Features, labels, MOS and indices of the samples in `indices` whose image decodes (one worker's share)."""
    shards = ShardSet(root, name)
    feats, labels, mos, kept = [], [], [], []
    for i in indices:
        img, meta = read_image(shards, i, None, None)
        if img is None:
            continue
        feats.append(features(img))
        labels.append(int(meta["label"]))
        mos.append(float(meta["mos"]) if meta.get("mos") is not None else np.nan)
        kept.append(i)
    return feats, labels, mos, kept


def set_features(shards: ShardSet, workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features, label, MOS, sample index) of every sample of a set whose image decodes, whole images at native
    resolution, in `workers` processes (0: one per usable core; the result does not depend on it). A 1024x768 photo
    takes up to half a second on one core of the dev box, so a KonIQ-sized set wants every core."""
    n = len(shards)
    chunks = [range(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(chunks))
    jobs = [(str(shards.root), shards.name, c) for c in chunks]
    if workers <= 1:
        parts = [_chunk_features(*j) for j in jobs]
    else:
        with get_context("spawn").Pool(workers) as pool:  # spawn: safe beside torch's threads and a gloo group
            parts = pool.starmap(_chunk_features, jobs)
    feats, labels, mos, kept = ([x for part in parts for x in part[k]] for k in range(4))
    return np.array(feats).reshape(len(feats), -1), np.array(labels), np.array(mos), np.array(kept, dtype=np.int64)


class Ridge:
    """Ridge regression on standardised features and their squares (a second-order model, still linear in its
    weights); `alpha` is the L2 strength."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def _expand(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mu) / self.sd
        return np.hstack([z, z * z / np.sqrt(2)])

    def fit(self, x: np.ndarray, y: np.ndarray) -> Ridge:
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-8
        z = self._expand(x)
        self.zmu, self.ymu = z.mean(0), y.mean()
        zc = z - self.zmu
        self.w = np.linalg.solve(zc.T @ zc + self.alpha * np.eye(z.shape[1]), zc.T @ (y - self.ymu))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self._expand(x) - self.zmu) @ self.w + self.ymu


def reference_predictions(root: str, splits: tuple[str, ...], scheme: dict) -> dict[str, dict]:
    """Fit on the labelled train set (MOS where known, else the level's midpoint), choose alpha on val by SRCC, and
    predict each of `splits`: {split: {"label", "mos", "score" (predicted MOS), "pred" (level), "alpha", "idx" (the
    samples predicted: those whose image decodes)}}. Every set's features are extracted once, however many splits
    ask for them."""
    edges = LabelScheme(tuple(scheme["edges"]))
    mids = np.array([1.0, *edges.edges, 5.0])
    mids = (mids[:-1] + mids[1:]) / 2
    feats = {name: set_features(ShardSet(root, name)) for name in dict.fromkeys(("train", "val", *splits))}
    x_tr, l_tr, m_tr, _ = feats["train"]
    y_tr = np.where(np.isnan(m_tr), mids[l_tr], m_tr)
    best = (-np.inf, ALPHAS[0])
    x_va, l_va, m_va, _ = feats["val"]
    if len(x_va):
        target = np.where(np.isnan(m_va), l_va, m_va)
        for alpha in ALPHAS:
            rho = stats.spearmanr(Ridge(alpha).fit(x_tr, y_tr).predict(x_va), target).statistic
            best = max(best, (np.nan_to_num(rho, nan=-1.0), alpha))
    model = Ridge(best[1]).fit(x_tr, y_tr)
    out = {}
    for split in splits:
        x, labels, mos, idx = feats[split]
        score = model.predict(x)
        out[split] = {"label": labels, "mos": mos, "score": score, "pred": edges.labels(score), "alpha": best[1],
                      "idx": idx}  # fmt: skip
    return out
