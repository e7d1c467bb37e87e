"""`sslfw data prepare`: real (or embedded) KonIQ-10k / KADIS-700k layouts -> one validated manifest.

The manifest is the single source of truth that packing reads: labelled rows (key, image path, MOS, MOS_zscore,
votes, ordinal label, split) and unlabelled rows (key, image path), plus meta.json with the label scheme, the split
and its hash. Every problem in the input is reported with the file and line it comes from and what to do about it.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslfw import fsio
from sslfw.data.labels import NUM_CLASSES, LabelScheme
from sslfw.errors import DataError

KONIQ_SCORES = "koniq10k_scores_and_distributions.csv"
KONIQ_IMAGE_DIRS = ("1024x768", "512x384", "images")
KADIS_CSV = "kadis700k_ref_imgs.csv"
SPLITS = ("train", "val", "test")
OFFICIAL_SET_NAMES = {"training": "train", "validation": "val", "test": "test"}
MANIFEST_FILES = ("labelled.csv", "unlabelled.csv", "meta.json")
LABELLED_COLUMNS = ["key", "path", "source", "mos", "mos_zscore", "c1", "c2", "c3", "c4", "c5", "label", "split"]


@dataclass
class LabelledRow:
    key: str
    path: str
    source: str
    mos: float = math.nan  # 1..5; NaN for hand-labelled extras that have no MOS
    mos_zscore: float = math.nan
    votes: list[float] = field(default_factory=list)  # c1..c5 when the source has them
    label: int = -1
    split: str = ""


def make_key(source: str, name: str) -> str:
    """WebDataset splits a member name at its first dot, so keys are the stem with anything unusual replaced."""
    return f"{source}_{re.sub(r'[^A-Za-z0-9_-]', '-', Path(name).stem)}"


def _read_csv(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, {column: text}); checks the header and the field count of every row."""
    if not path.is_file():
        raise DataError(f"{path}: file not found. Point the option at the dataset folder that holds it.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text. Re-save the file as UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{path}, line 1: header lacks column(s) {missing}; found {header}. Is this the right file?"
            )
        rows = []
        for lineno, fields in enumerate(reader, start=2):
            if not fields or all(not x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}, line {lineno}: {len(fields)} fields where the header has {len(header)}. "
                    f"Fix or delete this row."
                )
            rows.append((lineno, dict(zip(header, (x.strip() for x in fields)))))
    return rows


def _utf8_path(path: Path, where: str) -> str:
    """The resolved path as text the manifest can store; a file name that is not UTF-8 cannot be written to csv."""
    text = str(path.resolve())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{where}: the file name {path.name.encode('utf-8', 'surrogateescape')!r} is not UTF-8. Rename it "
            f"(e.g. with `convmv -f latin1 -t utf-8`)"
        ) from None
    return text


def _number(path: Path, lineno: int, column: str, text: str, lo: float, hi: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}, line {lineno}: {column}={text!r} is not a number. Fix or delete this row.") from None
    if not lo <= value <= hi or not math.isfinite(value):
        raise DataError(
            f"{path}, line {lineno}: {column}={value} is outside {lo}..{hi}. "
            f"Check that the file uses the documented scale, or fix this row."
        )
    return value


def _plain_name(path: Path, lineno: int, column: str, name: str) -> str:
    """An image name must stay inside the dataset's folder: no absolute path, no `..` (one file could otherwise be
    read from anywhere, or land in a labelled split and the pool at once)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(
            f"{path}, line {lineno}: {column}={name!r} leaves the dataset folder; give the file's name inside it."
        )
    return name


def _check_unique(path: Path, seen: dict[str, int], key: str, lineno: int, what: str) -> None:
    if key in seen:
        raise DataError(
            f"{path}, line {lineno}: duplicate {what} {key!r} (first on line {seen[key]}). Remove one of the two rows."
        )
    seen[key] = lineno


def read_koniq(root: Path, image_dir: str | None = None) -> list[LabelledRow]:
    """KonIQ-10k: the scores csv plus the image folder next to it (1024x768/ preferred, then 512x384/)."""
    root = Path(root)
    scores = root / KONIQ_SCORES
    names = [image_dir] if image_dir else [d for d in KONIQ_IMAGE_DIRS if (root / d).is_dir()]
    if not names or not (root / names[0]).is_dir():
        raise DataError(
            f"{root}: no image folder ({' or '.join(KONIQ_IMAGE_DIRS)}). Unpack the KonIQ image "
            f"archive there or pass --koniq-images."
        )
    images = root / names[0]
    out: list[LabelledRow] = []
    seen: dict[str, int] = {}
    for lineno, r in _read_csv(scores, ["image_name", "MOS"]):
        name = _plain_name(scores, lineno, "image_name", r["image_name"])
        _check_unique(scores, seen, name, lineno, "image_name")
        path = images / name
        if not path.is_file():
            raise DataError(f"{scores}, line {lineno}: image {path} does not exist. Copy it there or delete the row.")
        row = LabelledRow(
            make_key("koniq", name),
            _utf8_path(path, f"{scores}, line {lineno}"),
            "koniq",
            mos=_number(scores, lineno, "MOS", r["MOS"], 1.0, 5.0),
        )
        if r.get("MOS_zscore"):
            row.mos_zscore = _number(scores, lineno, "MOS_zscore", r["MOS_zscore"], 0.0, 100.0)
        if all(r.get(f"c{k}") for k in range(1, 6)):
            row.votes = [_number(scores, lineno, f"c{k}", r[f"c{k}"], 0.0, math.inf) for k in range(1, 6)]
        out.append(row)
    if not out:
        raise DataError(f"{scores}: no data rows.")
    return out


def read_kadis(root: Path) -> list[tuple[str, str]]:
    """KADIS-700k pristine pool: (key, path) for ref_imgs/, listed by kadis700k_ref_imgs.csv when present."""
    root = Path(root)
    ref = root / "ref_imgs"
    if not ref.is_dir():
        raise DataError(f"{root}: no ref_imgs/ folder. Point --kadis at the unpacked kadis700k folder.")
    listing = root / KADIS_CSV
    if listing.is_file():
        entries = [(lineno, r["ref_im"]) for lineno, r in _read_csv(listing, ["ref_im"])]
    else:
        entries = [(0, p.name) for p in sorted(ref.glob("*.png"))]
    out, seen = [], {}
    for lineno, name in entries:
        _plain_name(listing, lineno, "ref_im", name)
        _check_unique(listing, seen, name, lineno, "ref_im")
        path = ref / name
        if not path.is_file():
            raise DataError(f"{listing}, line {lineno}: image {path} does not exist. Copy it there or delete the row.")
        out.append((make_key("kadis", name), _utf8_path(path, f"{listing}, line {lineno}" if lineno else str(ref))))
    return out


def read_extra(csv_path: Path, kadis_root: Path | None) -> list[LabelledRow]:
    """Hand labels (image_name,label[,MOS]); images are looked up in KADIS ref_imgs/, then next to the csv."""
    csv_path = Path(csv_path)
    out, seen = [], {}
    for lineno, r in _read_csv(csv_path, ["image_name", "label"]):
        name = _plain_name(csv_path, lineno, "image_name", r["image_name"])
        _check_unique(csv_path, seen, name, lineno, "image_name")
        candidates = ([Path(kadis_root) / "ref_imgs" / name] if kadis_root else []) + [csv_path.parent / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{csv_path}, line {lineno}: image {name} not found in {[str(c) for c in candidates]}.")
        label = _number(csv_path, lineno, "label", r["label"], 0, NUM_CLASSES - 1)
        if label != int(label):
            raise DataError(f"{csv_path}, line {lineno}: label={r['label']!r} must be an integer 0..4.")
        row = LabelledRow(
            make_key("kadis", name), _utf8_path(path, f"{csv_path}, line {lineno}"), "extra", label=int(label)
        )
        if r.get("MOS"):
            row.mos = _number(csv_path, lineno, "MOS", r["MOS"], 1.0, 5.0)
        out.append(row)
    return out


def read_official_split(sets_csv: Path) -> dict[str, str]:
    """KonIQ's koniq10k_distributions_sets.csv: image_name -> train/val/test."""
    out = {}
    for lineno, r in _read_csv(Path(sets_csv), ["image_name", "set"]):
        if r["set"] not in OFFICIAL_SET_NAMES:
            raise DataError(f"{sets_csv}, line {lineno}: set={r['set']!r}; expected one of {list(OFFICIAL_SET_NAMES)}.")
        out[r["image_name"]] = OFFICIAL_SET_NAMES[r["set"]]
    return out


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
    koniq: Path,
    kadis: Path | None,
    out: Path,
    extra_labels: Path | None = None,
    bins: str | None = None,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    koniq_sets: Path | None = None,
    koniq_images: str | None = None,
    labelled_fraction: float = 1.0,
) -> dict:
    """Read, validate, label and split; write out/labelled.csv, out/unlabelled.csv and out/meta.json.
    `labelled_fraction` < 1 keeps that share of the train split labelled (stratified, seeded) and moves the rest,
    without their labels, into the unlabelled pool: a benchmark with few labels and a pool from the same source."""
    if abs(sum(split) - 1.0) > 1e-6 or min(split) < 0:
        raise DataError(f"--split {split}: three non-negative fractions that sum to 1, e.g. 0.8,0.1,0.1.")
    if not 0 < labelled_fraction <= 1:
        raise DataError(f"--labelled-fraction {labelled_fraction}: give a share in (0, 1]")
    labelled = read_koniq(koniq, koniq_images)
    try:
        scheme = LabelScheme.parse(bins, np.array([r.mos for r in labelled]))
    except ValueError as e:
        raise DataError(str(e) if str(e).startswith("--bins") else f"--bins {bins!r}: {e}") from None
    for r in labelled:
        r.label = scheme.label(r.mos)
    extras = read_extra(extra_labels, kadis) if extra_labels else []
    pool = read_kadis(kadis) if kadis else []
    extra_keys = {r.key for r in extras}
    pool = [(k, p) for k, p in pool if k not in extra_keys]  # a hand-labelled image is no longer unlabelled
    labelled += extras
    seen: dict[str, str] = {}
    for key, path in [(r.key, r.path) for r in labelled] + pool:
        if key in seen:
            raise DataError(f"key {key!r} is used by both {seen[key]} and {path}; rename one of the files.")
        seen[key] = path

    if koniq_sets:
        official = read_official_split(koniq_sets)
        for r in labelled:
            name = Path(r.path).name
            if r.source == "koniq" and name not in official:
                raise DataError(f"{koniq_sets}: no set for {name}. Use the sets file that matches the scores file.")
            r.split = official.get(name, "train") if r.source == "koniq" else "train"  # extras train only
        method = {"method": "official", "file": str(koniq_sets)}
    else:
        splits = stratified_split(np.array([r.label for r in labelled]), split, seed)
        for r, s in zip(labelled, splits):
            r.split = str(s)
        method = {"method": "stratified", "fractions": list(split), "seed": seed}

    moved: list[tuple[str, str]] = []
    if labelled_fraction < 1:
        train = [r for r in labelled if r.split == "train"]
        keep = stratified_split(np.array([r.label for r in train]), (labelled_fraction, 1 - labelled_fraction, 0), seed)
        gone = {id(r) for r, k in zip(train, keep) if k != "train"}
        moved = [(r.key, r.path) for r in train if id(r) in gone]
        labelled = [r for r in labelled if id(r) not in gone]
        pool = pool + moved
        method["labelled_fraction"] = labelled_fraction

    out = Path(out)
    rows = [
        [
            r.key,
            r.path,
            r.source,
            _fmt(r.mos),
            _fmt(r.mos_zscore),
            *(_fmt(v) for v in (r.votes or [math.nan] * 5)),
            r.label,
            r.split,
        ]
        for r in labelled
    ]
    labels = np.array([r.label for r in labelled])
    split_col = np.array([r.split for r in labelled])
    meta = {
        "label_scheme": scheme.to_dict(),
        "split": {**method, "sha256": split_hash(labelled)},
        "counts": {s: int((split_col == s).sum()) for s in SPLITS}
        | {"unlabelled": len(pool), "extra": len(extras), "moved_to_pool": len(moved)},
        "class_counts": {s: np.bincount(labels[split_col == s], minlength=NUM_CLASSES).tolist() for s in SPLITS},
        "class_shares": (np.bincount(labels, minlength=NUM_CLASSES) / len(labels)).round(4).tolist(),
        "sources": {
            "koniq": str(Path(koniq).resolve()),
            "kadis": str(Path(kadis).resolve()) if kadis else None,
            "extra_labels": str(Path(extra_labels).resolve()) if extra_labels else None,
        },
    }
    with fsio.staged_dir(out, lambda name: name in MANIFEST_FILES) as stage:  # the files appear together or not
        fsio.write_csv(stage / "labelled.csv", LABELLED_COLUMNS, rows)
        fsio.write_csv(stage / "unlabelled.csv", ["key", "path"], [list(p) for p in pool])
        fsio.write_json(stage / "meta.json", meta)
    return meta


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


def load(manifest: Path) -> tuple[list[LabelledRow], list[tuple[str, str]], dict]:
    """Read a manifest written by prepare(): labelled rows, unlabelled (key, path) pairs, meta."""
    manifest = Path(manifest)
    meta_path = manifest / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{manifest}: no meta.json; run `sslfw data prepare --out {manifest}` first.")
    meta = fsio.read_json(meta_path, f"rerun `sslfw data prepare --out {manifest}`")
    labelled = []
    for _, r in _read_csv(manifest / "labelled.csv", LABELLED_COLUMNS):
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
    pool = [(r["key"], r["path"]) for _, r in _read_csv(manifest / "unlabelled.csv", ["key", "path"])]
    if split_hash(labelled) != meta["split"]["sha256"] or len(pool) != meta["counts"]["unlabelled"]:
        raise DataError(
            f"{manifest}: labelled.csv/unlabelled.csv do not match meta.json (edited, or mixed from two prepares); "
            f"rerun `sslfw data prepare --out {manifest}`"
        )
    return labelled, pool, meta
