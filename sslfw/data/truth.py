"""The embedded dataset's hidden truth (`synth_truth.csv`), read by the report only, never by training.

Every data seed names its images alike (826000000.jpg, ...), so a truth file of another seed would score the
pseudo-labels against other images' levels without a word. The file therefore carries each KonIQ image's crowd
MOS exactly as synth wrote it into the scores csv, and `truth_levels` checks it against the MOS packed into the
shards for the same keys before any level is trusted.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sslfw.data.importers import make_key
from sslfw.data.labels import LabelScheme
from sslfw.data.reader import ShardSet
from sslfw.errors import DataError

TOLERANCE = 1e-5  # the csv keeps 6 decimals of the MOS, the pack parses the same text


def _read(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read this hidden-truth csv ({e})") from None
    if not rows or not {"image", "true_mos"} <= set(rows[0]):
        raise DataError(f"{path}: no image and true_mos columns; pass the synth_truth.csv that sslfw data synth wrote")
    return rows


def _check_same_data(path: Path, crowd: dict[str, float], shards: ShardSet) -> None:
    """A DataError when the truth file's crowd MOS disagrees with the pack's for the keys both have."""
    compared, wrong = 0, []
    for i in range(len(shards)):
        m = shards.meta(i)
        if m["key"] in crowd and m.get("mos") is not None:
            compared += 1
            if abs(float(m["mos"]) - crowd[m["key"]]) > TOLERANCE:
                wrong.append((m["key"], crowd[m["key"]], float(m["mos"])))
    if wrong:
        key, theirs, ours = wrong[0]
        raise DataError(
            f"{path}: the crowd MOS of {len(wrong)} of {compared} images differs from {shards.root}'s (e.g. {key}: "
            f"{theirs:.4f} there, {ours:.4f} in the pack): it describes another dataset (another data seed?); pass "
            f"the synth_truth.csv of the data these shards were packed from"
        )


def truth_levels(path: str | Path, shards: ShardSet, scheme: dict) -> dict[str, int]:
    """Hidden true level per sample key (noise-free MOS through the pack's bin edges), after checking that the file
    belongs to the data in `shards` (a labelled set of the pack). A file from before the crowd_mos column is
    refused: it cannot be checked."""
    path = Path(path)
    rows = _read(path)
    if "crowd_mos" not in rows[0]:
        raise DataError(
            f"{path}: written before truth files could be checked against a pack (no crowd_mos column); rerun "
            f"sslfw data synth with the same seed and counts into {path.parent} (it writes the same images)"
        )
    keys = [make_key("koniq" if r["image"].startswith("koniq") else "kadis", Path(r["image"]).name) for r in rows]
    _check_same_data(path, {k: float(r["crowd_mos"]) for k, r in zip(keys, rows) if r["crowd_mos"]}, shards)
    edges = LabelScheme(tuple(scheme["edges"]))
    return {k: edges.label(float(r["true_mos"])) for k, r in zip(keys, rows)}
