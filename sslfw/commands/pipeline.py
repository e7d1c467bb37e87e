"""`sslfw pipeline`: the paper's protocol for a list of algorithms, strong-view policies and seeds.

For each run: SSL stage -> pseudo-label the unlabelled pool -> supervised retraining on labelled + pseudo-labelled
data -> evaluation; the supervised baseline is the SSL stage with algorithm `supervised` and no retraining, and a
`ridge_teacher` row is a supervised student of the classical model's pseudo-labels (sslfw/commands/teacher.py). Every
stage leaves a completion mark (a final checkpoint, a csv, an eval.json), so re-running skips finished stages and
resumes unfinished ones. Then a report like the paper's Table 2 (mean +- std over seeds, plus the constant-guess
row) in markdown and csv, and learning-curve PNGs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from itertools import product
from pathlib import Path

from sslfw import ckpt
from sslfw.algorithms import names
from sslfw.commands.evaljob import run_eval
from sslfw.commands.pipeline_config import PipelineConfig
from sslfw.commands.pseudolabel import pseudolabel
from sslfw.commands.report import report_to_wandb, write_report
from sslfw.commands.teacher import reference_pseudolabel
from sslfw.config import Config, nested
from sslfw.data.reader import ShardSet
from sslfw.data.shards import load_index
from sslfw.data.truth import truth_levels
from sslfw.dist import barrier, is_main_process
from sslfw.errors import ConfigError
from sslfw.preempt import EXIT_PREEMPTED
from sslfw.runconfig import load_config
from sslfw.train import train


def _finished(run_dir: Path, steps: int) -> bool:
    found = ckpt.valid_checkpoints(run_dir)
    return bool(found) and found[-1][0] >= steps


def _train_stage(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    if not _finished(run_dir, cfg.train.steps):
        result = train(cfg)
        if result["exit_code"] != 0:
            raise SystemExit(result["exit_code"])  # preempted or diverged: rerun the pipeline to resume
    return run_dir


TEACHER = "ridge_teacher"  # a row, not an SSL algorithm: supervised on labels + features + ridge's pseudo-labels


def _one_policy(algorithm: str) -> bool:
    """Rows without strong views: one per seed whatever the policies, and no pseudo-labelling or retraining."""
    return algorithm in ("supervised", TEACHER)


def teacher_csv(p: PipelineConfig) -> Path:
    """The classical teacher's pseudo-labels of the pool, made once per pipeline for every ridge_teacher row."""
    return Path(p.out_dir) / f"{TEACHER}.csv"


def group_name(out_dir: Path) -> str:
    """A pipeline's W&B group: its folder and the one above, which name it and its data ("demo/data-seed0"), not
    a path that depends on where it was started."""
    return "/".join(Path(out_dir).resolve().parts[-2:])


def run_name(algorithm: str, policy: str, seed: int) -> str:
    return f"{algorithm}-s{seed}" if _one_policy(algorithm) else f"{algorithm}-{policy}-s{seed}"


def _wandb_names(p: PipelineConfig, algorithm: str, policy: str, seed: int, stage: str) -> dict:
    """W&B identity of a stage: grouped by the pipeline (group_name), named run/stage, typed and tagged."""
    tags = [algorithm, f"seed{seed}"] + ([] if _one_policy(algorithm) else [policy])
    return {"log.group": group_name(Path(p.out_dir)), "log.name": f"{run_name(algorithm, policy, seed)}/{stage}",
            "log.job_type": stage,
            "log.tags": tags}  # fmt: skip


def ssl_overrides(p: PipelineConfig, algorithm: str, policy: str, seed: int) -> dict:
    student = {"algorithm.name": "supervised", "data.pseudo_labels": str(teacher_csv(p)),
               "data.pseudo_share": p.teacher_share}  # fmt: skip
    return {
        **_wandb_names(p, algorithm, policy, seed, "ssl"),
        **p.ssl,
        "run_dir": str(Path(p.out_dir) / run_name(algorithm, policy, seed) / "ssl"),
        "algorithm.name": algorithm,
        "algorithm.params": p.params.get(algorithm, {}),
        "train.seed": seed,
        "aug.strong": policy,
        **(student if algorithm == TEACHER else {}),
    }


def _paths(p: PipelineConfig, d: Path) -> dict[str, Path]:
    """What depends on the chosen checkpoint in run folder `d`: evaluations, pseudo-labels, retraining (`*-best`
    beside the last checkpoint's)."""
    s = "" if p.checkpoint == "last" else f"-{p.checkpoint}"
    return {"eval_ssl": d / f"eval_ssl{s}", "pseudo": d / f"pseudo{s}.csv", "retrain": d / f"retrain{s}",
            "eval": d / f"eval{s}"}  # fmt: skip


def _files(p: PipelineConfig, d: Path) -> dict:
    """A run's report inputs: its folder, final evaluation and pseudo-labels (a ridge_teacher row's: the teacher's)."""
    pseudo = teacher_csv(p) if d.name.startswith(f"{TEACHER}-s") else _paths(p, d)["pseudo"]
    return {"dir": str(d), "eval": str(_paths(p, d)["eval"]), "pseudo": str(pseudo)}


def _pick(p: PipelineConfig, run_dir: Path) -> Path:
    return run_dir / ckpt.BEST if p.checkpoint == "best" else run_dir


def retrain_overrides(p: PipelineConfig, algorithm: str, policy: str, seed: int) -> dict:
    paths = _paths(p, Path(p.out_dir) / run_name(algorithm, policy, seed))
    return {
        **_wandb_names(p, algorithm, policy, seed, paths["retrain"].name),
        **p.retrain,
        "run_dir": str(paths["retrain"]),
        "algorithm.name": "supervised",
        "train.seed": seed,
        "data.pseudo_labels": str(paths["pseudo"]),
        "data.pseudo_min_confidence": p.min_confidence,
    }


def runs(p: PipelineConfig) -> list[tuple[str, str, int]]:
    """(algorithm, policy, seed) of every run; supervised and ridge_teacher have no strong views, so one row whatever
    the policies."""
    grid = product(p.algorithms, p.policies, p.seeds)
    return [(a, pol, s) for a, pol, s in grid if not _one_policy(a) or pol == p.policies[0]]


Stage = tuple[str, str, int, str]  # algorithm, policy, seed, "ssl" | "retrain"


def check(p: PipelineConfig) -> dict[Stage, Config]:
    """Every stage's config, resolved once (algorithm names, policies, per-algorithm params, overrides) before the
    first stage starts: a typo fails now, not an hour in, and the stages train with exactly what was checked."""
    for section in ("ssl", "retrain"):
        for key in getattr(p, section):
            if key.startswith(("algorithm.name", "algorithm.params")):
                raise ConfigError(
                    f"{section}.{key}: set algorithms with `algorithms:` and their settings with "
                    f"`params: {{ALGORITHM: {{KEY: VALUE}}}}`"
                )
    if not (p.algorithms and p.policies and p.seeds):
        raise ConfigError("algorithms, policies and seeds must each name at least one entry")
    for name in p.params:  # settings of algorithms this run does not select are checked, then left unused
        if name not in names():
            raise ConfigError(f"params.{name}: no algorithm {name!r}; the algorithms are {names()}")
        if name not in p.algorithms:
            load_config(p.base, nested(ssl_overrides(p, name, p.policies[0], p.seeds[0])))
    stages = {}
    for algorithm, policy, seed in runs(p):
        stages[algorithm, policy, seed, "ssl"] = load_config(p.base, nested(ssl_overrides(p, algorithm, policy, seed)))
        if not _one_policy(algorithm) and p.retrain_stage:
            over = nested(retrain_overrides(p, algorithm, policy, seed))
            stages[algorithm, policy, seed, "retrain"] = load_config(p.base, over)
    if p.truth and Path(p.truth).is_file():  # a truth file of other data fails now, not after the training
        shards = stages[(*runs(p)[0], "ssl")].data.shards
        truth_levels(p.truth, ShardSet(shards, p.eval_split), load_index(Path(shards))["label_scheme"])
    return stages


def run_one(p: PipelineConfig, stages: dict[Stage, Config], algorithm: str, policy: str, seed: int) -> dict:
    """One row's stages. Each derived file is checked against what it was derived from (the checkpoint's sha256),
    so a rerun with more SSL steps redoes the evaluation, pseudo-labels and retraining instead of reusing them."""
    d = Path(p.out_dir) / run_name(algorithm, policy, seed)
    paths = _paths(p, d)
    ssl = _train_stage(stages[algorithm, policy, seed, "ssl"])
    final, metrics = ssl, {}
    if not _one_policy(algorithm) and p.retrain_stage:
        metrics["ssl"] = _evaluate(p, _pick(p, ssl), paths["eval_ssl"])
        if _stale_pseudo(paths["pseudo"], _pick(p, ssl)) and is_main_process():
            _move_aside(paths["pseudo"], paths["pseudo"].with_name(paths["pseudo"].name + ".parts"), paths["retrain"])
        barrier()
        if not paths["pseudo"].is_file():
            done = pseudolabel(_pick(p, ssl), paths["pseudo"], weights=p.weights, crops=p.crops, progress=False)
            if done["exit_code"]:
                raise SystemExit(EXIT_PREEMPTED)  # stopped by a signal: rerun the pipeline to resume
        final = _train_stage(stages[algorithm, policy, seed, "retrain"])
    metrics["final"] = _evaluate(p, _pick(p, final), paths["eval"])
    return metrics | _files(p, d) | {"seed": seed}


def _stale_pseudo(csv_path: Path, checkpoint: Path) -> bool:
    """Pseudo-labels made by another checkpoint than the stage's current one (the SSL stage ran further)."""
    job = csv_path.with_name(csv_path.name + ".parts") / "job.json"
    if not csv_path.is_file() or not job.is_file():
        return False
    made_by = json.loads(job.read_text()).get("checkpoint_sha256")
    return made_by != ckpt.recorded_sha256(ckpt.resolve(checkpoint, "checkpoint"))


def _move_aside(*paths: Path) -> None:
    """Derived outputs of an older stage: kept beside, renamed `NAME.stale-N`, never deleted."""
    for path in paths:
        if path.exists():
            n = 1 + sum(1 for _ in path.parent.glob(f"{path.name}.stale-*"))
            os.replace(path, path.with_name(f"{path.name}.stale-{n}"))
            print(f"[sslfw] pipeline: {path} was made from an older checkpoint; moved to {path.name}.stale-{n}")


def _evaluate(p: PipelineConfig, run_dir: Path, out: Path) -> dict:
    current = ckpt.recorded_sha256(ckpt.resolve(run_dir, "checkpoint"))
    found = out / "eval.json"
    if found.is_file() and json.loads(found.read_text()).get("checkpoint_sha256") != current and is_main_process():
        _move_aside(out)  # an evaluation of an older checkpoint of this stage
    barrier()
    if not found.is_file():
        run_eval(run_dir, p.eval_split, p.weights, p.crops, out=out, to_wandb=False)  # the report run has them
    barrier()
    return json.loads(found.read_text())["metrics"]


def _finished_run(p: PipelineConfig, d: Path) -> dict | None:
    """The stages' metrics of a run whose final evaluation exists, else None."""
    read = {name: _paths(p, d)[sub] / "eval.json" for name, sub in (("final", "eval"), ("ssl", "eval_ssl"))}
    if not read["final"].is_file():
        return None
    return {name: json.loads(f.read_text())["metrics"] for name, f in read.items() if f.is_file()} | _files(p, d)


def run_pipeline(p: PipelineConfig) -> dict:
    rows = runs(p)
    if p.count_rows:  # printed as the verb's JSON line: {"rows": N}
        return {"rows": len(rows)}
    if not -1 <= p.row < len(rows):
        raise ConfigError(f"row: {p.row} is not a row of this grid (0..{len(rows) - 1}, or -1 for all)")
    stages = check(p)
    results: dict[str, list[dict]] = {}
    mine = rows if p.row < 0 else rows[p.row : p.row + 1]
    if not p.report_only and any(a == TEACHER for a, _, _ in mine):
        if is_main_process() and not teacher_csv(p).is_file():
            shards = stages[(*mine[0], "ssl")].data.shards
            reference_pseudolabel(Path(shards), teacher_csv(p), None, "reference")
        barrier()
    for algorithm, policy, seed in mine:
        label = algorithm if _one_policy(algorithm) else f"{algorithm} ({policy})"
        if p.report_only:
            done = _finished_run(p, Path(p.out_dir) / run_name(algorithm, policy, seed))
            if done:
                results.setdefault(label, []).append(done | {"seed": seed})
            continue
        results.setdefault(label, []).append(run_one(p, stages, algorithm, policy, seed))
    if p.row >= 0:  # one array task's row: the report job that runs after them all writes the report
        return {"row": p.row, "run": run_name(*rows[p.row])}
    out = {"report": str(Path(p.out_dir) / "report.md"), "rows": len(results)}
    if is_main_process():
        first = stages[(*runs(p)[0], "ssl")]
        shards = first.data.shards  # the shards the runs used
        setting = f"{p.weights} weights, {p.crops} crop(s), {p.checkpoint} checkpoint"
        write_report(Path(p.out_dir), shards, p.eval_split, setting, results, p.truth, p.retrain_stage,
                     _paths(p, Path(p.out_dir))["retrain"].name)  # fmt: skip
        out["report_text"] = (Path(p.out_dir) / "report.md").read_text()
        log = first.log  # report_to_wandb names its own run
        if log.wandb != "disabled":
            pngs = [Path(r["eval"]) / "confusion.png" for done in results.values() for r in done]
            report_to_wandb(Path(p.out_dir), log, group_name(Path(p.out_dir)), asdict(p), pngs)
    barrier()
    return out
