"""Where images and ratings come from: one importer per source, each turning a dataset's own layout into manifest
rows, every problem named by file and line. `sslfw data prepare` (sslfw/data/manifest.py) then labels, splits and
writes what they return. A new source is one reader here and one row of IMPORTERS.

- koniq: KonIQ-10k (scores csv + image folder, optionally its official split)
- ratings: any folder of images + a csv with an image column and a score column on any scale (SPAQ, LIVE-itW,
  PaQ-2-PiQ, your own): scores are mapped linearly onto KonIQ's 1..5 MOS scale from the given or observed range
- extra: hand labels (image_name,label[,MOS])
- kadis: KADIS-700k's pristine photos, the unlabelled pool
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sslfw.data.labels import NUM_CLASSES
from sslfw.errors import DataError

KONIQ_SCORES = "koniq10k_scores_and_distributions.csv"
KONIQ_IMAGE_DIRS = ("1024x768", "512x384", "images")
KADIS_CSV = "kadis700k_ref_imgs.csv"
OFFICIAL_SET_NAMES = {"training": "train", "validation": "val", "test": "test"}


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


# Bounds on a label or listing csv (KADIS-700k's listing, the largest real one, is ~30 MB and 700k rows): memory
# stays within ~10x the file, and a wrong file (an image, a tar) is one line, not minutes of parsing.
MAX_CSV_BYTES = 256 << 20


def read_csv(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, {column: text}); checks the header and the field count of every row."""
    if not path.is_file():
        raise DataError(f"{path}: file not found. Point the option at the dataset folder that holds it.")
    if (size := path.stat().st_size) > MAX_CSV_BYTES:
        raise DataError(f"{path}: {size:,} bytes is over the {MAX_CSV_BYTES >> 20} MiB a label csv may have; split it")
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
        try:
            return _rows(path, reader, required)
        except csv.Error as e:  # a field over csv's 128 KiB limit
            raise DataError(f"{path}, line {reader.line_num}: {e}; is this a csv?") from None


def _rows(path: Path, reader: Iterator[list[str]], required: list[str]) -> list[tuple[int, dict[str, str]]]:
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}, line 1: header lacks column(s) {missing}; found {header}. Is this the right file?")
    rows = []
    for lineno, fields in enumerate(reader, start=2):
        if not fields or all(not x.strip() for x in fields):
            continue
        if len(fields) != len(header):
            raise DataError(
                f"{path}, line {lineno}: {len(fields)} fields where the header has {len(header)}. "
                "Fix or delete this row."
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
    for lineno, r in read_csv(scores, ["image_name", "MOS"]):
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
        entries = [(lineno, r["ref_im"]) for lineno, r in read_csv(listing, ["ref_im"])]
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
    for lineno, r in read_csv(csv_path, ["image_name", "label"]):
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
    for lineno, r in read_csv(Path(sets_csv), ["image_name", "set"]):
        if r["set"] not in OFFICIAL_SET_NAMES:
            raise DataError(f"{sets_csv}, line {lineno}: set={r['set']!r}; expected one of {list(OFFICIAL_SET_NAMES)}.")
        out[r["image_name"]] = OFFICIAL_SET_NAMES[r["set"]]
    return out


def ratings_scale(
    csv_path: Path, score_column: str, score_range: tuple[float, float] | None
) -> tuple[list[tuple[int, dict[str, str]]], list[float], tuple[float, float]]:
    """(rows, scores, the scale's ends): `score_range` when given (scores outside it refused), else the lowest and
    highest score in the file."""
    if score_range is not None and (len(score_range) != 2 or not score_range[1] > score_range[0]):
        raise DataError(f"--score-range {score_range}: give LOW,HIGH with LOW < HIGH, e.g. 0,100")
    rows = read_csv(csv_path, [score_column])
    if not rows:
        raise DataError(f"{csv_path}: no data rows.")
    lo, hi = score_range or (-math.inf, math.inf)
    scores = [_number(csv_path, n, score_column, r[score_column], lo, hi) for n, r in rows]
    if score_range is None:
        lo, hi = min(scores), max(scores)
    if not hi > lo:
        raise DataError(f"{csv_path}: every {score_column} is {lo}; give --score-range LOW,HIGH of the scale")
    return rows, scores, (lo, hi)


def read_ratings(
    csv_path: Path,
    images: Path | None = None,
    image_column: str = "image",
    score_column: str = "score",
    score_range: tuple[float, float] | None = None,
) -> list[LabelledRow]:
    """Any csv of ratings: `image_column` names a file inside `images` (default: the csv's folder), `score_column`
    a number on the source's scale, higher = better. The scale's ends (`ratings_scale`) map linearly onto 1..5, the
    scale the label edges are given on."""
    csv_path = Path(csv_path)
    images = Path(images) if images else csv_path.parent
    read_csv(csv_path, [image_column, score_column])  # both columns named in one message when missing
    rows, scores, (lo, hi) = ratings_scale(csv_path, score_column, score_range)
    seen: dict[str, int] = {}
    out = []
    for (lineno, r), score in zip(rows, scores):
        name = _plain_name(csv_path, lineno, image_column, r[image_column])
        _check_unique(csv_path, seen, name, lineno, image_column)
        path = images / name
        if not path.is_file():
            raise DataError(f"{csv_path}, line {lineno}: image {path} does not exist. Copy it there or delete the row.")
        mos = 1 + 4 * (score - lo) / (hi - lo)
        out.append(LabelledRow(make_key("ratings", name), _utf8_path(path, f"{csv_path}, line {lineno}"), "ratings",
                               mos=mos))  # fmt: skip
    return out


@dataclass
class Sources:
    """What the importers found: rated rows (labelled through the label scheme), hand-labelled extras, the pool,
    and what meta.json records about where they came from."""

    rated: list[LabelledRow] = field(default_factory=list)
    extras: list[LabelledRow] = field(default_factory=list)
    pool: list[tuple[str, str]] = field(default_factory=list)
    described: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Importer:
    kind: str  # "rated", "extras" or "pool": where its rows go in Sources
    read: Callable
    what: str


IMPORTERS = {
    "koniq": Importer("rated", read_koniq, "KonIQ-10k: koniq10k_scores_and_distributions.csv + 1024x768/"),
    "ratings": Importer("rated", read_ratings, "any csv of image names and scores, images in a folder"),
    "extra": Importer("extras", read_extra, "hand labels: image_name,label[,MOS]"),
    "kadis": Importer("pool", read_kadis, "KADIS-700k ref_imgs/: the unlabelled pool"),
}


def import_sources(**given: dict | None) -> Sources:
    """Run each named importer with its arguments (`koniq={"root": ...}`, `kadis=None` to skip)."""
    src = Sources()
    for name, kwargs in given.items():
        if kwargs is None:
            continue
        importer = IMPORTERS[name]
        getattr(src, importer.kind).extend(importer.read(**kwargs))
        src.described[name] = {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in kwargs.items()}
        if name == "ratings":  # the scale the scores were read on, given or observed
            scale = ratings_scale(
                Path(kwargs["csv_path"]), kwargs.get("score_column", "score"), kwargs.get("score_range")
            )
            src.described[name]["score_range"] = list(scale[2])
    if not src.rated and not src.extras:
        raise DataError("no labelled images: give --koniq or --ratings (with --image-column/--score-column)")
    return src
