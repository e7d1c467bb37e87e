"""Pseudo-label trace: which target each unlabelled image got at each step, and whether it passed the threshold.

The trainer keeps the algorithm's pseudo-labels as device tensors (no host sync inside the step) and writes them
per rank at every evaluation and checkpoint as `run_dir/pseudo_trace/r{rank}-upto-{step}.npz` (arrays step, key,
label, used, and `data`: the identity of the pack it trained on, which `load` checks against the reader's). A
resumed run first deletes the chunks past its checkpoint, so the trace always describes the steps the model
actually took. Training never reads the hidden truth; `accuracy_series` joins the trace with it afterwards, which
is how the report shows pseudo-label accuracy *over training* rather than only at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from sslfw import fsio
from sslfw.data.shards import identity_mismatch
from sslfw.errors import DataError

DIR = "pseudo_trace"
_CHUNK = re.compile(r"r(\d+)-upto-(\d+)\.npz")


class PseudoTrace:
    """Per-rank writer; `add` is called every step, `flush` at evaluations, checkpoints and the end."""

    def __init__(self, run_dir: Path, rank: int, start: int, data: dict):
        self.dir, self.rank, self.data = Path(run_dir) / DIR, rank, json.dumps(data, sort_keys=True)
        self.rows: list[tuple[int, list[str], torch.Tensor, torch.Tensor]] = []
        for f in self.dir.glob(f"r{rank}-upto-*.npz"):  # chunks of steps a resumed run will take again
            m = _CHUNK.fullmatch(f.name)
            if m and int(m.group(2)) > start:
                f.unlink()

    def add(self, step: int, keys: list[str], labels: torch.Tensor, used: torch.Tensor) -> None:
        self.rows.append((step, keys, labels.detach(), used.detach()))

    def flush(self, upto: int) -> None:
        if not self.rows:
            return
        steps = np.concatenate([np.full(len(k), s, np.int32) for s, k, _, _ in self.rows])
        keys = np.array([k for _, ks, _, _ in self.rows for k in ks])
        labels = torch.cat([lab for _, _, lab, _ in self.rows]).to("cpu", torch.int8).numpy()
        used = torch.cat([u for _, _, _, u in self.rows]).cpu().numpy() > 0
        with fsio.atomic_open(self.dir / f"r{self.rank}-upto-{upto:07d}.npz") as f:
            np.savez_compressed(f, step=steps, key=keys, label=labels, used=used, data=np.array(self.data))
        self.rows = []


def load(run_dir: Path, data: dict) -> dict[str, np.ndarray] | None:
    """All chunks of all ranks, concatenated; None when the run left no trace (supervised, or an older run). A chunk
    made on another pack than `data` (the reader's shards identity: keys name other images there) is one DataError."""
    files = sorted((Path(run_dir) / DIR).glob("r*-upto-*.npz"))
    if not files:
        return None
    parts = [np.load(f, allow_pickle=False) for f in files]
    for f, p in zip(files, parts):
        made_on = json.loads(str(p["data"])) if "data" in p else None  # chunks before the record: unchecked
        if made_on is not None and (diff := identity_mismatch(made_on, data)):
            raise DataError(f"{f}: this trace was made on other shards than the report reads ({diff}); give the "
                            "shards the run trained on")  # fmt: skip
    return {k: np.concatenate([p[k] for p in parts]) for k in ("step", "key", "label", "used")}


def accuracy_series(
    run_dir: Path, data: dict, truth: dict[str, int], bin_steps: int, min_used: int = 10
) -> dict[str, np.ndarray] | None:
    """Per bin of `bin_steps` steps (labelled by its last step): accuracy of the pseudo-labels that passed the
    threshold ("used_acc"), of all of them ("all_acc"), the share that passed ("mask") and how many passed ("used").
    Images without a truth entry are left out; a bin where fewer than `min_used` passed has used_acc NaN (an accuracy
    of 3 labels is noise, not a trend). "overall_used_acc" is that accuracy over all steps (the report's column), so a
    trace, which can be large, is read once for both."""
    t = load(run_dir, data)
    if t is None:
        return None
    known = np.array([k in truth for k in t["key"]])
    if not known.any():
        return None
    step, label, used = t["step"][known], t["label"][known].astype(np.int64), t["used"][known]
    correct = label == np.array([truth[k] for k in t["key"][known]])
    bins = (step - 1) // bin_steps  # steps are 1-based in the trace: the step the update produced
    out: dict[str, list[float]] = {"step": [], "used_acc": [], "all_acc": [], "mask": [], "used": []}
    for b in np.unique(bins):
        sel = bins == b
        n_used = int(used[sel].sum())
        out["step"].append(float((b + 1) * bin_steps))
        out["used_acc"].append(float(correct[sel & used].mean()) if n_used >= min_used else float("nan"))
        out["all_acc"].append(float(correct[sel].mean()))
        out["mask"].append(n_used / int(sel.sum()))
        out["used"].append(float(n_used))
    overall = float(correct[used].mean()) if used.any() else float("nan")
    return {k: np.array(v) for k, v in out.items()} | {"overall_used_acc": np.array(overall)}
