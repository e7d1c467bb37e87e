"""`sslfw data synth`: an embedded IQA dataset in the real KonIQ-10k / KADIS-700k layouts, with no download.

Content is scikit-image's bundled CC0/public-domain photos plus procedural dead-leaves images, cropped at random,
"shot" with camera defects that vary from image to image (defocus, sensor noise, over-exposure, or none), then given
one KADID-style distortion at one of 5 levels (or left undistorted). The hidden quality is a full-reference score of
the stored image against the ideal crop (frmetrics.py), so it is a function of what the file shows, a blind model
can learn it, and it varies among undistorted images too. Crowd votes c1..c5 are simulated from that score, as
KonIQ's were from real raters.

Every image is drawn from its own generator seeded by (seed, pool, index), so output is byte-identical for the same
flags whatever the number of worker processes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from sslfw import fsio
from sslfw.data.distortions import DEFAULT_MIX, DISTORTIONS, distort, to_uint8
from sslfw.data.frmetrics import CALIBRATION_QUANTILES, fr_quality, quality_to_mos
from sslfw.data.labels import DEFAULT_EDGES, LabelScheme

KONIQ_HEADER = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
KONIQ_SETS_HEADER = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
POOL_IDS = {"koniq": 1, "kadis": 2}
# How shots vary before any distortion: probability of each defect and its range (Gaussian defocus sigma in pixels,
# sensor noise std, exposure gain). The ranges start where a blind model can see the defect, so the flawless shots
# (about 1 in 5 here, 2 % of all images once distortions are drawn) form a learnable top level. Under-exposure is
# left out: on content of unknown brightness it cannot be told from a dark scene.
CAPTURE = {
    "p_defocus": 0.5, "defocus": (1.0, 2.0),
    "p_noise": 0.5, "noise": (0.02, 0.04),
    "p_exposure": 0.2, "exposure": (1.3, 1.8),
}  # fmt: skip


@dataclass(frozen=True)
class SynthConfig:
    out: Path
    koniq_count: int = 1500
    kadis_count: int = 3000
    extra_count: int = 60
    width: int = 128
    height: int = 96
    seed: int = 0
    pristine_fraction: float = 0.12
    photo_fraction: float = 0.5
    workers: int = 0  # 0: one per core
    distortions: tuple[int, ...] = DEFAULT_MIX  # KADID codes drawn from (distortions.py)


@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)()[..., :3], dtype=np.uint8)


def dead_leaves(height: int, width: int, rng: np.random.Generator, n_disks: int = 250) -> np.ndarray:
    """Occluding disks with power-law radii: scale-invariant edges and flat areas, like natural photos."""
    rmin, rmax = 1.5, max(height, width) / 3
    radii = np.sort(np.minimum(rmin * (1 - rng.random(n_disks)) ** (-1 / 2.0), rmax))[::-1]
    cy = rng.uniform(-radii, height + radii)
    cx = rng.uniform(-radii, width + radii)
    colours = rng.uniform(0.05, 0.95, (n_disks + 1, 3)).astype(np.float32)
    # Draw a label map (big disks first, so small ones end on top and stay visible), then colour it at once.
    labels = Image.new("I", (width, height), n_disks)
    draw = ImageDraw.Draw(labels)
    for k, (r, y, x) in enumerate(zip(radii, cy, cx)):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=k)
    lab = np.asarray(labels)
    yy = np.arange(height, dtype=np.float32)[:, None]
    centre = np.append(cy, height / 2).astype(np.float32)
    radius = np.append(radii, height).astype(np.float32)
    shade = 1 + 0.15 * (yy - centre[lab]) / np.maximum(radius[lab], 1.0)  # soft shading: disks are not flat fills
    return np.clip(colours[lab] * shade[..., None], 0, 1)


@cache
def _photo_at(name: str, height: int, width: int, bucket: int) -> np.ndarray:
    """The photo downscaled (clean, antialiased) to one of 8 scales between "crop fills it" and half size."""
    photo = Image.fromarray(_photo(name))
    fit = max(height / photo.height, width / photo.width) * 1.05
    scale = fit + (max(0.5, fit * 1.1) - fit) * bucket / 7
    size = (max(width, round(photo.width * scale)), max(height, round(photo.height * scale)))
    return np.asarray(photo.resize(size, Image.LANCZOS), dtype=np.float32) / 255.0


def clean_crop(cfg: SynthConfig, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A pristine crop of cfg.height x cfg.width: a rescaled photo window or a dead-leaves image."""
    if rng.random() >= cfg.photo_fraction:
        return "deadleaves", dead_leaves(cfg.height, cfg.width, rng)
    name = PHOTOS[rng.integers(len(PHOTOS))]
    small = _photo_at(name, cfg.height, cfg.width, int(rng.integers(8)))  # crops vary in content scale
    y = rng.integers(small.shape[0] - cfg.height + 1)
    x = rng.integers(small.shape[1] - cfg.width + 1)
    crop = small[y : y + cfg.height, x : x + cfg.width]
    return name, crop[:, ::-1].copy() if rng.random() < 0.5 else crop


def capture(ideal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The shot as a camera took it: defocus, sensor noise and exposure vary from photo to photo, so quality varies
    among undistorted images too, as it does among KonIQ's in-the-wild photos. Some shots are flawless."""
    defocus = float(rng.uniform(*CAPTURE["defocus"])) if rng.random() < CAPTURE["p_defocus"] else 0.0
    noise = float(rng.uniform(*CAPTURE["noise"])) if rng.random() < CAPTURE["p_noise"] else 0.0
    exposure = float(rng.uniform(*CAPTURE["exposure"])) if rng.random() < CAPTURE["p_exposure"] else 1.0
    img = ndimage.gaussian_filter(ideal, (defocus, defocus, 0), mode="reflect") if defocus > 0.05 else ideal
    img = np.clip(img * np.float32(exposure), 0, 1)  # over-exposure clips highlights, as a sensor does
    if noise > 0:
        img = np.clip(img + rng.normal(0.0, noise, img.shape).astype(np.float32), 0, 1)
    return img.astype(np.float32), {"defocus": defocus, "noise": noise, "exposure": exposure}


def make_sample(cfg: SynthConfig, pool: str, index: int) -> dict:
    """One image: bytes as stored, its distortion, its hidden quality and simulated crowd votes."""
    rng = np.random.default_rng([cfg.seed, POOL_IDS[pool], index])
    content, clean = clean_crop(cfg, rng)
    shot, shot_info = capture(clean, rng)
    if rng.random() < cfg.pristine_fraction:
        code, level = 0, 0
    else:
        code, level = int(rng.choice(cfg.distortions)), int(rng.integers(1, 6))
    dist = distort(shot, code, level, rng)
    buf = io.BytesIO()
    if pool == "koniq":  # KonIQ ships JPEGs; the score is measured on the decoded file, artefacts included
        Image.fromarray(to_uint8(dist)).save(buf, format="JPEG", quality=95, subsampling=0)
    else:  # KADIS ships PNGs
        Image.fromarray(to_uint8(dist)).save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    q = fr_quality(clean, stored)
    true_mos = float(quality_to_mos(q))
    # Raters: each votes round(true quality + personal noise) on the 1..5 ACR scale, as in KonIQ's crowd study.
    n_raters = int(rng.integers(93, 158))
    votes = np.clip(np.round(rng.normal(true_mos, 0.55, n_raters)), 1, 5).astype(int)
    counts = np.bincount(votes, minlength=6)[1:]
    mos = float(votes.mean())
    return {
        "data": data,
        "content": content,
        "code": code,
        "level": level,
        "q": q,
        "true_mos": true_mos,
        "counts": counts.tolist(),
        "mos": mos,
        "sd": float(votes.std(ddof=1)),
        **shot_info,
    }


def mos_to_zscore(mos: float) -> float:
    """KonIQ's MOS_zscore (0..100) is close to linear in MOS (1..5); fitted on the official extremes."""
    return float(np.clip(26.29 * mos - 24.9, 0.0, 100.0))


def _generate(cfg: SynthConfig, pool: str, count: int) -> list[dict]:
    workers = cfg.workers or os.cpu_count() or 1
    jobs = [(cfg, pool, i) for i in range(count)]
    if workers == 1 or count < 64:
        return [make_sample(*j) for j in jobs]
    with get_context("spawn").Pool(workers) as p:
        return p.starmap(make_sample, jobs, chunksize=32)


def _write_koniq_csvs(cfg: SynthConfig, koniq_dir: Path, koniq_names: list[str], koniq: list[dict]) -> None:
    """KonIQ's scores csv (votes, MOS, SD, MOS_zscore) and its official-split file."""
    rows = [
        [n, *s["counts"], sum(s["counts"]), f"{s['mos']:.6f}", f"{s['sd']:.6f}", f"{mos_to_zscore(s['mos']):.6f}"]
        for n, s in zip(koniq_names, koniq)
    ]
    fsio.write_csv(koniq_dir / "koniq10k_scores_and_distributions.csv", KONIQ_HEADER, rows)
    # The official-split file: fractions c1..c5, MOS on 0..100 and a set column (7058/1000/2015 on the real one).
    rng = np.random.default_rng([cfg.seed, 7])
    sets = rng.choice(["training", "validation", "test"], size=len(koniq), p=[0.7, 0.1, 0.2])
    rows = [
        [
            n,
            *[f"{c / sum(s['counts']):.6f}" for c in s["counts"]],
            sum(s["counts"]),
            f"{mos_to_zscore(s['mos']):.6f}",
            f"{s['sd']:.6f}",
            st,
        ]
        for n, s, st in zip(koniq_names, koniq, sets)
    ]
    fsio.write_csv(koniq_dir / "koniq10k_distributions_sets.csv", KONIQ_SETS_HEADER, rows)


def synthesize(cfg: SynthConfig) -> dict:
    """Write the KonIQ-layout labelled set, the KADIS-layout pool and the extra labels; return a summary."""
    unknown = set(cfg.distortions) - set(DISTORTIONS)
    if unknown:
        raise ValueError(f"--distortions: no distortion with code(s) {sorted(unknown)}; known: {sorted(DISTORTIONS)}")
    out = Path(cfg.out)
    koniq_dir, kadis_dir = out / "koniq10k", out / "kadis700k"
    (koniq_dir / "1024x768").mkdir(parents=True, exist_ok=True)  # KonIQ's folder name, whatever the pixel size
    (kadis_dir / "ref_imgs").mkdir(parents=True, exist_ok=True)

    koniq = _generate(cfg, "koniq", cfg.koniq_count)
    kadis = _generate(cfg, "kadis", cfg.kadis_count)
    koniq_names = [f"{826000000 + i}.jpg" for i in range(len(koniq))]
    kadis_names = [f"{s['content'].replace('_', '-')}-{i:07d}.png" for i, s in enumerate(kadis)]
    for name, s in zip(koniq_names, koniq):
        fsio.write_bytes(koniq_dir / "1024x768" / name, s["data"])
    for name, s in zip(kadis_names, kadis):
        fsio.write_bytes(kadis_dir / "ref_imgs" / name, s["data"])

    _write_koniq_csvs(cfg, koniq_dir, koniq_names, koniq)

    # KADIS assigns each reference one distortion type for its generator; we record the one we used.
    rows = [[n, s["code"] or 1, ""] for n, s in zip(kadis_names, kadis)]
    fsio.write_csv(kadis_dir / "kadis700k_ref_imgs.csv", ["ref_im", "dist_type_1", "dist_type_2"], rows)

    # Hand labels for a few pool images, like the paper's 359 extra KADIS labels.
    scheme = LabelScheme(DEFAULT_EDGES)
    pick = np.sort(
        np.random.default_rng([cfg.seed, 8]).choice(len(kadis), min(cfg.extra_count, len(kadis)), replace=False)
    )
    rows = [[kadis_names[i], scheme.label(kadis[i]["true_mos"])] for i in pick]
    fsio.write_csv(out / "kadis_extra_labels.csv", ["image_name", "label"], rows)

    # Hidden truth for every image (never read by training): lets pseudo-labels be scored on the pool.
    rows = [
        [path, s["content"], f"{s['defocus']:.3f}", f"{s['noise']:.4f}", f"{s['exposure']:.3f}", s["code"], s["level"]]
        + [f"{s['q']:.6f}", f"{s['true_mos']:.6f}", crowd]
        for path, s, crowd in [(f"koniq10k/1024x768/{n}", s, f"{s['mos']:.6f}") for n, s in zip(koniq_names, koniq)]
        + [(f"kadis700k/ref_imgs/{n}", s, "") for n, s in zip(kadis_names, kadis)]
    ]
    # crowd_mos (the MOS written into KonIQ's csv) lets a reader check the file against a pack: every data seed
    # names its images alike (sslfw/data/truth.py).
    header = ["image", "content", "defocus", "noise", "exposure", "dist_type", "dist_level", "fr_quality", "true_mos",
              "crowd_mos"]  # fmt: skip
    fsio.write_csv(out / "synth_truth.csv", header, rows)

    labels = np.array([scheme.label(s["mos"]) for s in koniq])
    return {
        "koniq_images": len(koniq),
        "kadis_images": len(kadis),
        "extra_labels": len(pick),
        "label_shares": (np.bincount(labels, minlength=5) / max(len(labels), 1)).round(4).tolist(),
    }


def calibrate(cfg: SynthConfig, count: int = 4000) -> list[float]:
    """Quantiles of fr_quality over the default mixture: the knots behind frmetrics.MOS_KNOTS_Q."""
    q = np.array([s["q"] for s in _generate(cfg, "koniq", count)])
    return np.quantile(q, CALIBRATION_QUANTILES).round(4).tolist()
