"""`sslfw predict`: quality level and score for image files or folders, to CSV (stdout or a file)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sslfw import fsio
from sslfw.data.stream import decode_crop, fixed_crops
from sslfw.errors import DataError
from sslfw.inference import load_model
from sslfw.model import expected_score

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
COLUMNS = ["path", "level", "score", "p0", "p1", "p2", "p3", "p4"]


def list_images(inputs: list[Path]) -> list[Path]:
    """Files as given (each must be an image) and, for folders, their image files by suffix, sorted."""
    out = []
    for p in inputs:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not out:
        raise DataError(f"no image files in {[str(p) for p in inputs]} (looked for {sorted(IMAGE_SUFFIXES)})")
    return out


def load_views(path: Path, size: int, crops: int) -> np.ndarray:
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a decompression bomb ({e}); downscale it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(
            f"{path}: not a readable image ({type(e).__name__}: {e}); remove it or pass image files only"
        ) from None
    if crops == 1:
        return decode_crop(data, (size, size), None)[None]
    return fixed_crops(decode_crop(data, None, None), (size, size))


@torch.no_grad()
def predict_files(
    checkpoint: Path,
    inputs: list[Path],
    out: Path | None = None,
    weights: str = "ema",
    crops: int = 1,
    batch_size: int = 32,
) -> list[list]:
    if out is not None and Path(out).is_dir():
        raise DataError(f"--out {out}: is a folder; give the csv file to write")
    model, cfg, _ = load_model(checkpoint, weights)
    files = list_images(inputs)
    rows = []
    for lo in range(0, len(files), batch_size):
        chunk = files[lo : lo + batch_size]
        views = torch.from_numpy(np.stack([load_views(f, cfg.model.img_size, crops) for f in chunk]))
        x = views.movedim(-1, -3).float().flatten(0, 1) / 255
        probs = model(x)["logits"].float().softmax(-1).view(len(chunk), crops, -1).mean(1)
        score = expected_score(probs)
        for f, pr, sc in zip(chunk, probs, score):
            rows.append([str(f), int(pr.argmax()), f"{float(sc):.4f}", *(f"{float(p):.4f}" for p in pr)])
    if out is not None:
        fsio.write_csv(out, COLUMNS, rows)
    else:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(rows)
    return rows
