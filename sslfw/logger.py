"""Run logging on the main process: a JSONL metrics file (the source of truth) and W&B (offline by default).

The W&B run id is stored in the run directory, so a resumed run continues the same run; offline runs are uploaded
later with `wandb sync RUN_DIR/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from sslfw import fsio
from sslfw.config import LogConfig


def progress_bar(iterable=None, show: bool = True, **kw) -> tqdm:
    """A tqdm bar only where a person watches: a bar redrawn into a Slurm log or a CI file is noise."""
    return tqdm(iterable, disable=not (show and sys.stderr.isatty()), file=sys.stderr, **kw)


METRICS_LOG = "metrics.jsonl"  # one JSON object per line: {"step", "train/...", "val/..."}


def read_log(run_dir: Path) -> list[dict]:
    """The rows RunLogger wrote to RUN_DIR/metrics.jsonl (none if absent; a line torn by a kill is skipped)."""
    path = Path(run_dir) / METRICS_LOG
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunLogger:
    """metrics.jsonl (always, main process) and W&B (unless disabled). `summaries`: {"val/ema/srcc": "max", ...},
    so W&B's run summary holds each metric's best evaluation rather than its last."""

    def __init__(
        self, run_dir: Path, enabled: bool, log: LogConfig, config: dict, resume_step: int,
        summaries: dict[str, str] | None = None,
    ):  # fmt: skip
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_LOG
        self._wandb, self._offline_dir = None, None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if log.wandb != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            id_file = Path(run_dir) / "wandb_id"
            if not id_file.is_file():
                fsio.write_text(id_file, uuid.uuid4().hex[:12])
            self._wandb = wandb.init(
                project=log.project,
                entity=log.entity or None,
                name=log.name or "/".join(Path(run_dir).resolve().parts[-2:]),
                group=log.group or None,
                job_type=log.job_type,
                tags=list(log.tags) or None,
                id=id_file.read_text().strip(),
                resume="allow",
                mode=log.wandb,
                dir=str(run_dir),
                config=config,
            )
            if log.wandb == "offline":
                self._offline_dir = Path(self._wandb.dir).parent  # RUN_DIR/wandb/offline-run-...
            self._wandb.define_metric("train/step")
            self._wandb.define_metric("*", step_metric="train/step")
            for key, summary in (summaries or {}).items():
                self._wandb.define_metric(key, step_metric="train/step", summary=summary)

    def _truncate_after(self, step: int) -> None:
        """A resumed run replays steps after its checkpoint: drop their old rows (and a torn last line)."""
        if not self.path.is_file():
            return
        keep = [row for row in read_log(self.path.parent) if row.get("step", 0) <= step]
        fsio.write_text(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({"train/step": step, **metrics})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: Path) -> None:
        if self._wandb is not None and Path(path).is_file():
            import wandb

            self._wandb.log({key: wandb.Image(str(path))})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
            if self._offline_dir is not None:  # WANDB_SILENT hides wandb's own hint
                _flush_offline()
                print(
                    f"[sslfw] W&B offline run saved; upload it with: wandb sync {shlex.quote(str(self._offline_dir))}",
                    flush=True,
                )


def log_into_run(run_dir: Path, log: LogConfig, step: int, metrics: dict, images: dict[str, Path]) -> bool:
    """Add an evaluation (`sslfw eval`) to the W&B run that trained RUN_DIR: the same run id, resumed, so its
    metrics and confusion matrix sit beside the training curves (offline: `wandb sync` merges the two). False when
    that run kept no W&B run."""
    id_file = Path(run_dir) / "wandb_id"
    if log.wandb == "disabled" or not id_file.is_file():
        return False
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=log.project, entity=log.entity or None, id=id_file.read_text().strip(), resume="allow",
                     mode=log.wandb, dir=str(run_dir))  # fmt: skip
    run.log({"train/step": step, **metrics, **{k: wandb.Image(str(p)) for k, p in images.items() if Path(p).is_file()}})
    run.finish()
    if log.wandb == "offline":
        _flush_offline()
    return True


def _flush_offline() -> None:
    """finish() only asks W&B's service to close the run's file; it is complete once the service stops (at exit, or
    here), so a run we call saved is whole on disk even while this process goes on (the pipeline, in-process tests)."""
    import wandb

    wandb.teardown()
