"""Checkpoints as `step-N/` directories: written under `step-N.tmp/`, completed by a marker, then renamed.

A directory counts only if its COMPLETE marker exists, so a kill at any moment leaves either the old set of valid
checkpoints or the old set plus the new one, never a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from sslfw import fsio

MARKER = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


def valid_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first."""
    out = []
    for p in Path(run_dir).glob("step-*"):
        m = _STEP.match(p.name)
        if m and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(run_dir: Path) -> Path | None:
    found = valid_checkpoints(run_dir)
    return found[-1][1] if found else None


def save(run_dir: Path, step: int, state: dict, info: dict, keep: int) -> Path:
    """Write one checkpoint (call on the main process only) and prune to the newest `keep` valid ones."""
    run_dir = Path(run_dir)
    final, tmp = run_dir / f"step-{step}", run_dir / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with fsio.atomic_open(tmp / "state.pt") as f:
        torch.save(state, f)
    fsio.write_json(tmp / "trainer_state.json", info)
    fsio.write_text(tmp / MARKER, json.dumps({"step": step}) + "\n")
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in valid_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> tuple[dict, dict]:
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return state, json.loads((path / "trainer_state.json").read_text())
