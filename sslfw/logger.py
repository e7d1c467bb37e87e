"""Run logging on the main process: a JSONL metrics file (the source of truth) and W&B (offline by default).

The W&B run id is stored in the run directory, so a resumed run continues the same run; offline runs are uploaded
later with `wandb sync RUN_DIR/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from sslfw import fsio


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, wandb_mode: str, project: str, config: dict, resume_step: int):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            id_file = Path(run_dir) / "wandb_id"
            if not id_file.is_file():
                fsio.write_text(id_file, uuid.uuid4().hex[:12])
            self._wandb = wandb.init(
                project=project,
                id=id_file.read_text().strip(),
                resume="allow",
                mode=wandb_mode,
                dir=str(run_dir),
                config=config,
            )
            self._wandb.define_metric("train/step")
            self._wandb.define_metric("*", step_metric="train/step")

    def _truncate_after(self, step: int) -> None:
        """A resumed run replays steps after its checkpoint: drop their old rows (and a torn last line)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        fsio.write_text(self.path, "".join(f"{line}\n" for line in keep))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({"train/step": step, **metrics})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
