"""Reading a `sslfw pseudolabel` csv back for retraining: labels by pool index, checked against the pool."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sslfw import fsio
from sslfw.data.labels import NUM_CLASSES
from sslfw.data.reader import ShardSet
from sslfw.errors import DataError

COLUMNS = ["key", "idx", "p0", "p1", "p2", "p3", "p4", "label", "confidence", "score"]


def _parse(path: Path, lineno: int, r: dict, n: int) -> tuple[str, int, int, float]:
    """(key, idx, label, confidence) of one csv row, each checked; a bad row is one DataError naming its line."""
    missing = [c for c in ("key", "idx", "label", "confidence") if r.get(c) in (None, "")]
    if missing:
        raise DataError(f"{path}, line {lineno}: no {missing[0]}; use a csv written by sslfw pseudolabel")
    try:
        i, label, conf = int(r["idx"]), int(r["label"]), float(r["confidence"])
    except ValueError:
        raise DataError(
            f"{path}, line {lineno}: idx and label must be whole numbers and confidence a number; "
            f"use a csv written by sslfw pseudolabel"
        ) from None
    if not 0 <= i < n:
        raise DataError(f"{path}: idx {i} is outside this pool of {n} samples; was it made for other shards?")
    if not 0 <= label < NUM_CLASSES:
        raise DataError(f"{path}, line {lineno}: label {label} is not a level 0..{NUM_CLASSES - 1}")
    return r["key"], i, label, conf


def sidecar(csv_path: Path) -> Path:
    """PSEUDO.csv.json: the identity of what a pseudo-label csv was made from, written beside it by pseudolabel."""
    return csv_path.with_name(csv_path.name + ".json")


def check_made_for(path: Path, pool: ShardSet) -> None:
    """A csv whose sidecar names another pack of the pool (its fingerprint covers every pool shard's sha256) or
    whose bytes changed since it was written is one DataError; a csv without a sidecar is checked row by row only."""
    made = sidecar(path)
    if not made.is_file():
        return
    job = fsio.read_json(made, f"delete {made} to use {path.name} unchecked, or rerun sslfw pseudolabel")
    if job.get("pool_fingerprint") != pool.fingerprint:
        raise DataError(
            f"{path}: made for the pool of {job.get('shards')} (fingerprint {str(job.get('pool_fingerprint'))[:12]}), "
            f"not {pool.root} ({pool.fingerprint[:12]}); rerun sslfw pseudolabel on these shards"
        )
    if job.get("csv_sha256") not in (None, fsio.sha256_file(path)):
        raise DataError(
            f"{path}: changed since sslfw pseudolabel wrote it ({made} holds its sha256); rerun pseudolabel, or "
            f"delete {made.name} to train on the edited csv checked row by row only"
        )


def load_pseudo_labels(path: Path, pool: ShardSet, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels by idx, mask of rows with confidence >= min_confidence) from a pseudolabel csv for `pool`. Rows are
    matched by idx, and every row's key must be the pool's key at that idx: a csv made before a re-pack names
    other images at the same indices, and would silently teach them the wrong labels."""
    check_made_for(path, pool)
    n = len(pool)
    labels, keep = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
    try:  # row by row: memory stays that of the pool's arrays whatever the file holds
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            for lineno, r in enumerate(reader, start=2):
                key, i, label, conf = _parse(path, lineno, r, n)
                if labels[i] >= 0:
                    raise DataError(f"{path}, line {lineno}: idx {i} appears twice; rerun sslfw pseudolabel")
                if key != pool.meta(i)["key"]:
                    raise DataError(
                        f"{path}, line {lineno}: idx {i} is {key!r} there but {pool.meta(i)['key']!r} in "
                        f"{pool.root}: the csv was made for another pack of the pool; rerun sslfw pseudolabel on "
                        f"these shards"
                    )
                labels[i], keep[i] = label, conf >= min_confidence
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read this pseudo-label csv ({e})") from None
    if (labels < 0).any():
        raise DataError(f"{path}: no pseudo-label for {(labels < 0).sum()} of {n} pool samples; rerun pseudolabel")
    return labels, keep
