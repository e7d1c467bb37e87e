"""`sslfw predict`: quality level and score for image files or folders, to CSV (stdout or a file).

By default each image is scored whole: native-resolution windows of the model's input size tile it and their class
probabilities are averaged (`--crops all`, or 0 as `sslfw eval --crops 0`); `--crops 1` and `--crops 5` are the
centre and centre + corners views. Files that cannot be read are skipped and listed; the command fails only when
none could be scored. Columns: the level (0-4), `score` (the expected level, or a score head's MOS), `mos` (MOS
units, 1-5: a score head's own, else the level probabilities times each level's MOS-interval centre under the label
edges the model trained with), the five level probabilities and the number of views.
"""

from __future__ import annotations

import csv
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sslfw import ckpt, fsio
from sslfw.data.labels import DEFAULT_EDGES
from sslfw.data.reader import decode_crop
from sslfw.data.stream import multi_views
from sslfw.errors import DataError
from sslfw.evaluate import predict_views
from sslfw.inference import load_model
from sslfw.logger import progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
COLUMNS = ["path", "level", "score", "mos", "p0", "p1", "p2", "p3", "p4", "views"]


def level_centres(edges: list[float]) -> torch.Tensor:
    """Each level's MOS-interval centre: the edges cut KonIQ's 1..5 scale into five intervals."""
    cuts = torch.tensor([1.0, *edges, 5.0])
    return (cuts[:-1] + cuts[1:]) / 2


def list_images(inputs: list[Path]) -> list[Path]:
    """Files as given and, for folders, their image files by suffix, sorted."""
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
    """(n, size, size, 3) uint8 views of one file, decoded once; DataError naming the file when it is not a readable
    image."""
    try:
        data = path.read_bytes()
        if crops == 1:
            return decode_crop(data, (size, size), None)[None].copy()  # writable: torch shares the memory
        return multi_views(decode_crop(data, None, None), (size, size), crops)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a decompression bomb ({e}); downscale it first") from None
    except UnidentifiedImageError:  # Pillow's own text names the in-memory buffer, not the file
        raise DataError(f"{path}: not an image Pillow can read (unknown or damaged format)") from None
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def check_out(out: Path, inputs: list[Path]) -> None:
    """Before any scoring: --out must be a csv that can be written and must not replace a user's file (an image,
    one of the inputs: `--out photos/*.jpg` hands --out the first photo)."""
    if out.is_dir():
        raise DataError(f"--out {out}: is a folder; give the csv file to write")
    if out.suffix.lower() != ".csv":
        raise DataError(f"--out {out}: give a path ending in .csv (it would replace {out.name}'s contents)")
    if out.exists() and any(out.resolve() == f.resolve() for f in inputs):
        raise DataError(f"--out {out}: is one of the inputs; give a new .csv path")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise DataError(f"--out {out}: {parent} is not writable; give another path")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device here; use --device cpu")
    return torch.device(name)


@torch.no_grad()
def predict_files(
    checkpoint: Path,
    inputs: list[Path],
    out: Path | None = None,
    weights: str = "ema",
    crops: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Score every readable image; a summary (scored, skipped files, where the csv went)."""
    files = list_images(inputs)
    if out is not None:
        check_out(Path(out), files)
    dev = pick_device(device)
    model, cfg, used = load_model(checkpoint, weights)
    model.to(dev)
    centres = level_centres((ckpt.recorded_data(used) or {}).get("label_edges") or list(DEFAULT_EDGES))
    rows, skipped = [], []
    for f in progress_bar(files, show=progress and len(files) > 1, desc="predict", unit="img"):
        try:
            views = torch.from_numpy(load_views(f, cfg.model.img_size, crops))
        except DataError as e:
            skipped.append(str(e))
            continue
        x = views.movedim(-1, -3)  # uint8 until each batch_size of views is forwarded: big photos fit memory
        probs, score = predict_views(model, x, torch.tensor([len(x)]), dev, nullcontext, batch_size)
        pr, level = probs[0].cpu(), int(probs[0].argmax())
        mos = float(score[0]) if model.score is not None else float(pr @ centres)
        rows.append([str(f), level, f"{float(score[0]):.4f}", f"{mos:.3f}", *(f"{float(p):.4f}" for p in pr),
                     len(views)])  # fmt: skip
    if not rows and len(files) == 1:
        raise DataError(skipped[0])  # one file given, one reason: the usual one-line error
    for line in skipped:
        print(f"sslfw: skipped {line}", file=sys.stderr)
    if not rows:
        raise DataError(f"none of the {len(files)} file(s) could be scored (listed above)")
    if out is not None:
        fsio.write_csv(out, COLUMNS, rows)
    else:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(rows)
    return {"scored": len(rows), "skipped": len(skipped), "out": str(out) if out else "stdout", "checkpoint": str(used)}
