"""`sslfw demo`: the README's main job as one verb. It builds the few-label embedded benchmark for one data seed
(unless it is already there), then runs the pipeline on it and prints the report.

The benchmark (docs/RESULTS.md): 3,400 labelled images split 60/10/30 (a test split over 1,000 images), of which
15 % of the train split keep their labels and the rest join the 2,400-image pool (stratified, seeded, recorded in
the manifest), so the pool is over 10x the labelled set. Each step leaves a completion mark (the truth csv, the
manifest's meta.json, the shards' index.json; the pipeline's own marks), so a rerun picks up where it stopped,
and folders are named by the data seed, so another seed never overwrites them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sslfw.commands.pipeline import PipelineConfig, run_pipeline
from sslfw.config import parse_config
from sslfw.data.importers import import_sources
from sslfw.data.manifest import prepare
from sslfw.data.shards import pack
from sslfw.data.synth import SynthConfig, synthesize

KONIQ_COUNT = 3400  # 30 % test: 1,020 images
KADIS_COUNT = 2400
SPLIT = (0.6, 0.1, 0.3)
LABELLED_FRACTION = 0.15


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def build_data(seed: int, data_root: Path, shards_root: Path) -> tuple[Path, Path]:
    """(shards folder, hidden-truth csv) of the benchmark for data seed `seed`, built where missing."""
    raw, manifest = data_root / f"seed{seed}", data_root / f"seed{seed}" / "manifest"
    shards = shards_root / f"demo-seed{seed}"
    truth = raw / "synth_truth.csv"
    t0 = time.perf_counter()
    stale = truth.is_file() and "crowd_mos" not in truth.read_text().partition("\n")[0]  # older: nothing to check by
    if stale or not truth.is_file():  # written last by synthesize; the same seed writes the same images again
        _say(f"synthesising {KONIQ_COUNT} labelled + {KADIS_COUNT} pool images (data seed {seed}) into {raw}")
        synthesize(SynthConfig(out=raw, koniq_count=KONIQ_COUNT, kadis_count=KADIS_COUNT, extra_count=48, seed=seed))
    if not (manifest / "meta.json").is_file():
        found = import_sources(
            koniq={"root": raw / "koniq10k"},
            extra={"csv_path": raw / "kadis_extra_labels.csv", "kadis_root": raw / "kadis700k"},
            kadis={"root": raw / "kadis700k"},
        )
        prepare(
            found,
            manifest,
            split=SPLIT,
            seed=seed,
            labelled_fraction=LABELLED_FRACTION,
        )
    if not (shards / "index.json").is_file():
        index = pack(manifest, shards, seed=seed, progress=False)
        counts = {name: s["count"] for name, s in index["sets"].items()}
        _say(f"packed {counts} into {shards}")
    _say(f"data ready in {time.perf_counter() - t0:.0f}s: {shards}")
    return shards, truth


def run_demo(config: Path, seed: int, overrides: list[str], data_root: Path, shards_root: Path) -> dict:
    p = parse_config(config, overrides, cls=PipelineConfig)  # a typo in an override fails before any data is made
    shards, truth = build_data(seed, data_root, shards_root)
    p.out_dir = str(Path(p.out_dir) / f"data-seed{seed}")
    p.ssl = {**p.ssl, "data.shards": str(shards)}
    p.retrain = {**p.retrain, "data.shards": str(shards)}
    p.truth = str(truth)
    _say(f"pipeline: {p.algorithms} x seeds {p.seeds} -> {p.out_dir}")
    return run_pipeline(p)
