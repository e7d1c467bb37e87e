"""Reading a `sslfw pseudolabel` csv back for retraining: labels by pool index, checked against the pool."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sslfw.errors import DataError

COLUMNS = ["key", "idx", "p0", "p1", "p2", "p3", "p4", "label", "confidence", "score"]


def load_pseudo_labels(path: Path, n: int, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels by idx, mask of rows with confidence >= min_confidence) from a pseudolabel csv for a pool of n."""
    labels, keep = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            i = int(r["idx"])
            if not 0 <= i < n:
                raise DataError(f"{path}: idx {i} is outside this pool of {n} samples; was it made for other shards?")
            labels[i] = int(r["label"])
            keep[i] = float(r["confidence"]) >= min_confidence
    if (labels < 0).any():
        raise DataError(f"{path}: no pseudo-label for {(labels < 0).sum()} of {n} pool samples; rerun pseudolabel")
    return labels, keep
