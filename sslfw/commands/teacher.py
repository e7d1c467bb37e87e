"""`sslfw pseudolabel --teacher reference`: the classical features + ridge model pseudo-labels the pool.

The fine-tuned network is the teacher of the paper's retraining stage. With few labels the classical model
(sslfw/reference.py) ranks quality better than that network (docs/RESULTS.md, "Pretrained"), so it can be the
teacher instead: fit on the labelled train split with its strength chosen on val (as the report's reference row),
it scores every pool image, and a student trains on labels and these pseudo-labels (`sslfw train
--data.pseudo_labels=OUT --data.pseudo_share=0.5`). The csv has `sslfw pseudolabel`'s columns: p0..p4 one-hot at
the level its MOS falls in, confidence 1 (a ridge gives no probability, so a confidence cut keeps all), score = its
MOS; OUT.json records the pool's fingerprint, the pack's identity and the csv's sha256, so a student refuses it on
another pack. Memory: about 40 floats per image plus one decoded image at a time; one process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sslfw import fsio
from sslfw.commands.predict import check_out
from sslfw.data.labels import NUM_CLASSES
from sslfw.data.pseudo import COLUMNS, sidecar
from sslfw.data.reader import ShardSet
from sslfw.data.shards import identity, load_index
from sslfw.errors import ConfigError, DataError
from sslfw.reference import reference_predictions


def reference_pseudolabel(shards: Path | None, out: Path, checkpoint: Path | None, teacher: str) -> dict:
    """Write OUT (csv) and OUT.json: features + ridge pseudo-labels for every pool sample of `shards`. The CLI sends
    here `--teacher reference` and a call without --checkpoint, whose flags are checked first."""
    if teacher != "reference":
        raise ConfigError("--checkpoint: required (or --teacher reference, the classical model, with --shards)")
    if checkpoint is not None or shards is None:
        raise ConfigError("--teacher reference: give --shards (the pack to fit on and label) and no --checkpoint")
    out = Path(out)
    check_out(out, [])  # before the features: a csv path that can be written and replaces no user's file
    index = load_index(Path(shards))
    pool = ShardSet(shards, "unlabelled")
    if len(pool) == 0:
        raise DataError(f"{shards}: the unlabelled set is empty: nothing to pseudo-label (pack a pool with --kadis)")
    if index["sets"].get("train", {}).get("count", 0) < 2:
        raise DataError(f"{shards}: the train split has fewer than 2 labelled images: nothing to fit the teacher on")
    pred = reference_predictions(str(shards), ("unlabelled",), index["label_scheme"])["unlabelled"]
    if len(pred["idx"]) != len(pool):
        raise DataError(
            f"{shards}: {len(pool) - len(pred['idx'])} pool images no longer decode; run sslfw shards verify {shards}"
        )
    one_hot = np.eye(NUM_CLASSES)[pred["pred"]]
    rows = [
        [pool.meta(int(i))["key"], int(i), *(f"{p:.1f}" for p in ph), int(lb), "1.0", f"{sc:.6f}"]
        for i, ph, lb, sc in zip(pred["idx"], one_hot, pred["pred"], pred["score"])
    ]
    fsio.write_csv(out, COLUMNS, rows)
    job = {
        "teacher": "features + ridge",
        "alpha": pred["alpha"],
        "samples": len(pool),
        "shards": str(pool.root.resolve()),
        "pool_fingerprint": pool.fingerprint,
        "data": identity(index),
    }
    fsio.write_json(sidecar(out), job | {"csv_sha256": fsio.sha256_file(out)})
    return {"samples": len(pool), "alpha": pred["alpha"], "out": str(out),
            "label_counts": np.bincount(pred["pred"], minlength=NUM_CLASSES).tolist()}  # fmt: skip
