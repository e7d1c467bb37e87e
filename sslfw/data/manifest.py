"""`sslfw data prepare`: real (or embedded) KonIQ-10k / KADIS-700k layouts -> one validated manifest.

The manifest is the single source of truth that packing reads: labelled rows (key, image path, MOS, MOS_zscore,
votes, ordinal label, split) and unlabelled rows (key, image path), plus meta.json with the label scheme, the split
and its hash. Every problem in the input is reported with the file and line it comes from and what to do about it.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np

from sslfw import fsio
from sslfw.data.importers import LabelledRow, Sources, read_csv, read_official_split
from sslfw.data.labels import NUM_CLASSES, LabelScheme
from sslfw.errors import DataError

SPLITS = ("train", "val", "test")
MANIFEST_FILES = ("labelled.csv", "unlabelled.csv", "meta.json")
LABELLED_COLUMNS = ["key", "path", "source", "mos", "mos_zscore", "c1", "c2", "c3", "c4", "c5", "label", "split"]


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Per class, a seeded permutation cut at the fractions: every split keeps the class shares."""
    out = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng([seed, 11])
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(len(idx) * fractions[0])
        n_val = round(len(idx) * fractions[1])
        out[idx[:n_train]] = "train"
        out[idx[n_train : n_train + n_val]] = "val"
        out[idx[n_train + n_val :]] = "test"
    return out


def split_hash(rows: list[LabelledRow]) -> str:
    """sha256 over sorted "key,split" lines: two runs used the same split iff their hashes match."""
    return fsio.sha256_text("".join(f"{r.key},{r.split}\n" for r in sorted(rows, key=lambda r: r.key)))


def prepare(
    sources: Sources,
    out: Path,
    bins: str | None = None,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    koniq_sets: Path | None = None,
    labelled_fraction: float = 1.0,
) -> dict:
    """Label, split and write what the importers found (sslfw/data/importers.py): out/labelled.csv,
    out/unlabelled.csv and out/meta.json.
    `labelled_fraction` < 1 keeps that share of the train split labelled (stratified, seeded) and moves the rest,
    without their labels, into the unlabelled pool: a benchmark with few labels and a pool from the same source."""
    if abs(sum(split) - 1.0) > 1e-6 or min(split) < 0:
        raise DataError(f"--split {split}: three non-negative fractions that sum to 1, e.g. 0.8,0.1,0.1.")
    if not 0 < labelled_fraction <= 1:
        raise DataError(f"--labelled-fraction {labelled_fraction}: give a share in (0, 1]")
    labelled = list(sources.rated)
    try:
        scheme = LabelScheme.parse(bins, np.array([r.mos for r in labelled]))
    except ValueError as e:
        raise DataError(str(e) if str(e).startswith("--bins") else f"--bins {bins!r}: {e}") from None
    for r in labelled:
        r.label = scheme.label(r.mos)
    extras, pool = sources.extras, sources.pool
    extra_keys = {r.key for r in extras}
    pool = [(k, p) for k, p in pool if k not in extra_keys]  # a hand-labelled image is no longer unlabelled
    labelled += extras
    seen: dict[str, str] = {}
    for key, path in [(r.key, r.path) for r in labelled] + pool:
        if key in seen:
            raise DataError(f"key {key!r} is used by both {seen[key]} and {path}; rename one of the files.")
        seen[key] = path

    method = _assign_splits(labelled, split, seed, koniq_sets)

    moved: list[tuple[str, str]] = []
    if labelled_fraction < 1:
        train = [r for r in labelled if r.split == "train"]
        keep = stratified_split(np.array([r.label for r in train]), (labelled_fraction, 1 - labelled_fraction, 0), seed)
        gone = {id(r) for r, k in zip(train, keep) if k != "train"}
        moved = [(r.key, r.path) for r in train if id(r) in gone]
        labelled = [r for r in labelled if id(r) not in gone]
        pool = pool + moved
        method["labelled_fraction"] = labelled_fraction

    rows = [_csv_row(r) for r in labelled]
    counts = {"unlabelled": len(pool), "extra": len(extras), "moved_to_pool": len(moved)}
    meta = _meta(labelled, scheme, method, counts, sources.described)
    with fsio.staged_dir(Path(out), lambda name: name in MANIFEST_FILES) as stage:  # the files appear together or not
        fsio.write_csv(stage / "labelled.csv", LABELLED_COLUMNS, rows)
        fsio.write_csv(stage / "unlabelled.csv", ["key", "path"], [list(p) for p in pool])
        fsio.write_json(stage / "meta.json", meta)
    return meta


def _meta(labelled: list[LabelledRow], scheme: LabelScheme, method: dict, counts: dict, described: dict) -> dict:
    """meta.json: the label scheme, the split (with its hash), counts and level shares, where the data came from."""
    labels = np.array([r.label for r in labelled])
    split_col = np.array([r.split for r in labelled])
    return {
        "label_scheme": scheme.to_dict(),
        "split": {**method, "sha256": split_hash(labelled)},
        "counts": {s: int((split_col == s).sum()) for s in SPLITS} | counts,
        "class_counts": {s: np.bincount(labels[split_col == s], minlength=NUM_CLASSES).tolist() for s in SPLITS},
        "class_shares": (np.bincount(labels, minlength=NUM_CLASSES) / len(labels)).round(4).tolist(),
        "sources": described,
    }


def _assign_splits(
    labelled: list[LabelledRow], split: tuple[float, float, float], seed: int, koniq_sets: Path | None
) -> dict:
    """Set each row's split: KonIQ's official one (extras train only), else stratified by level; returns how."""
    if koniq_sets:
        official = read_official_split(koniq_sets)
        for r in labelled:
            name = Path(r.path).name
            if r.source == "koniq" and name not in official:
                raise DataError(f"{koniq_sets}: no set for {name}. Use the sets file that matches the scores file.")
            r.split = official.get(name, "train") if r.source == "koniq" else "train"
        return {"method": "official", "file": str(koniq_sets)}
    for r, s in zip(labelled, stratified_split(np.array([r.label for r in labelled]), split, seed)):
        r.split = str(s)
    return {"method": "stratified", "fractions": list(split), "seed": seed}


def _csv_row(r: LabelledRow) -> list:
    votes = r.votes or [math.nan] * 5
    return [r.key, r.path, r.source, _fmt(r.mos), _fmt(r.mos_zscore), *(_fmt(v) for v in votes), r.label, r.split]


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


def load(manifest: Path) -> tuple[list[LabelledRow], list[tuple[str, str]], dict]:
    """Read a manifest written by prepare(): labelled rows, unlabelled (key, path) pairs, meta."""
    manifest = Path(manifest)
    meta_path = manifest / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{manifest}: no meta.json; run `sslfw data prepare --out {shlex.quote(str(manifest))}` first.")
    meta = fsio.read_json(meta_path, f"rerun `sslfw data prepare --out {shlex.quote(str(manifest))}`")
    labelled = []
    for _, r in read_csv(manifest / "labelled.csv", LABELLED_COLUMNS):
        votes = [float(r[f"c{k}"]) for k in range(1, 6)] if r["c1"] else []
        labelled.append(
            LabelledRow(
                r["key"],
                r["path"],
                r["source"],
                float(r["mos"] or "nan"),
                float(r["mos_zscore"] or "nan"),
                votes,
                int(r["label"]),
                r["split"],
            )
        )
    pool = [(r["key"], r["path"]) for _, r in read_csv(manifest / "unlabelled.csv", ["key", "path"])]
    if split_hash(labelled) != meta["split"]["sha256"] or len(pool) != meta["counts"]["unlabelled"]:
        raise DataError(
            f"{manifest}: labelled.csv/unlabelled.csv do not match meta.json (edited, or mixed from two prepares); "
            f"rerun `sslfw data prepare --out {shlex.quote(str(manifest))}`"
        )
    return labelled, pool, meta
