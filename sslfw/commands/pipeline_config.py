"""The pipeline's own config (`sslfw pipeline --config FILE.yaml`, `sslfw demo`), apart from the pipeline's code so
that parsing it and `--help` import nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sslfw.config import Crops, Split, Weights


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"
    base: str = "configs/embedded_supervised.yaml"  # the training config both stages start from
    # rows: supervised, ridge_teacher (a student of the classical model's pseudo-labels) and any SSL algorithm (the
    # choices of `sslfw train`'s algorithm.name)
    algorithms: list = field(default_factory=lambda: ["supervised", "fixmatch"])
    policies: list = field(default_factory=lambda: ["iqa_safe"])  # strong views: iqa_safe and/or randaugment
    seeds: list = field(default_factory=lambda: [0])
    ssl: dict = field(default_factory=dict)  # dotted overrides for the SSL stage, e.g. {"train.steps": 300}
    params: dict = field(default_factory=dict)  # per algorithm: {fixmatch: {p_cutoff: 0.7}, freematch: {...}}
    retrain: dict = field(default_factory=dict)  # dotted overrides for the retraining stage
    # false: an SSL row is its SSL model (no pseudo-labelling, no retraining), which halves its cost
    retrain_stage: bool = True
    min_confidence: float = 0.0  # pseudo-labels below this confidence are not used for retraining
    teacher_share: float = 0.5  # ridge_teacher rows: share of each batch from the classical teacher's pseudo-labels
    eval_split: Split = "test"
    weights: Weights = "ema"  # the weights that pseudo-label the pool and are evaluated
    crops: Crops = 1  # views per image for pseudo-labels and eval (see Crops)
    # last | best: the checkpoint that pseudo-labels and is evaluated, of each stage: its last step, or the step with
    # the best val SRCC (kept by ckpt.keep_best). `best` writes its own pseudo-labels, retraining and evaluations
    # (`*-best`) beside last's, so one folder holds both.
    checkpoint: Literal["last", "best"] = "last"
    report_only: bool = False  # run nothing: report the runs that have finished so far
    # Run only this row of algorithms x policies x seeds (0-based, supervised once) and write no report: one Slurm
    # array task per row (slurm/pipeline_grid.sh), then a report_only job after them all. -1: every row.
    row: int = -1
    count_rows: bool = False  # print how many rows the grid has and run nothing (slurm/pipeline_grid.sh)
    truth: str = ""  # an embedded dataset's synth_truth.csv: the report scores pseudo-labels with it (training never)
