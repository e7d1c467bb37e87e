"""The one owner of checkpoints: what they hold (`Checkpointer`, `read`), where they are (`resolve`,
`resolve_resume`) and how they are written (`save`).

Layout: a `step-N/` directory holding `state.pt` (one entry per registered part: model, optimizer, algorithm, ema)
and `trainer_state.json` (step, skipped steps, world size, stream position, the resolved config, the val score).
Changing it is this file and tests/test_checkpoint.py. Writes go under `step-N.tmp/`, are completed by a marker,
then renamed.

A directory counts only if its COMPLETE marker exists and the files it lists have the sizes (and, for the one
chosen, the sha256) the marker records. A directory named `step-N` is never deleted in place: it is renamed aside
first. So a kill at any moment leaves the old valid checkpoints, or those plus the new one, and `latest` finds the
newest one that is intact, saying which damaged ones it skipped.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sslfw import faults, fsio
from sslfw.dist import barrier
from sslfw.errors import DataError

MARKER = "COMPLETE"
BEST = "best"  # RUN/best names the kept checkpoint with the best validation score
STATE, INFO = "state.pt", "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)(\.tmp|\.old)?$")


def _marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def problem(path: Path, deep: bool = False) -> str | None:
    """Why `path` is not a usable checkpoint (None if it is). `deep` also checks the sha256 of every file."""
    marker = _marker(path)
    if marker is None:
        return f"no readable {MARKER} marker"
    for name, want in marker.get("files", {}).items():  # markers before sslfw 0.2 list no files
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, the marker says {want['size']} (truncated or damaged)"
        if deep and fsio.sha256_file(f) != want["sha256"]:
            return f"{name} does not match its sha256 (damaged)"
    return None


def recorded_sha256(path: Path) -> str:
    """The state file's sha256 as its marker records it (computed for checkpoints whose marker predates it)."""
    marker = _marker(Path(path)) or {}
    return marker.get("files", {}).get(STATE, {}).get("sha256") or fsio.sha256_file(Path(path) / STATE)


def _candidates(run_dir: Path) -> dict[int, list[Path]]:
    """Per step, where it may be, best first: step-N, then a complete step-N.tmp or step-N.old left by a kill in
    the middle of a re-save."""
    out: dict[int, list[Path]] = {}
    for p in Path(run_dir).glob("step-*"):
        m = _STEP.match(p.name)
        if m and p.is_dir():
            out.setdefault(int(m.group(1)), []).append(p)
    order = {"": 0, ".tmp": 1, ".old": 2}
    return {s: sorted(ps, key=lambda p: order[_STEP.match(p.name).group(2) or ""]) for s, ps in out.items()}


def valid_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints (marker present, file sizes as recorded), oldest first."""
    out = []
    for step, paths in sorted(_candidates(run_dir).items()):
        good = [p for p in paths if problem(p) is None]
        if good:
            out.append((step, good[0]))
    return out


def latest(run_dir: Path, verbose: bool = True) -> Path | None:
    """The newest checkpoint whose files are intact (sha256 checked); damaged newer ones are skipped and named."""
    for _, paths in sorted(_candidates(run_dir).items(), reverse=True):
        for p in paths:
            why = problem(p, deep=True)
            if why is None:
                return p
            if verbose and (p / MARKER).exists():
                print(f"[sslfw] skipping checkpoint {p}: {why}", file=sys.stderr, flush=True)
    return None


def tidy(run_dir: Path) -> None:
    """Finish what a kill in the middle of a re-save left (call with the run folder locked): a complete step-N.tmp
    without its step-N takes that name, and a step-N.old beside an intact step-N goes."""
    for step, paths in _candidates(run_dir).items():
        final = Path(run_dir) / f"step-{step}"
        tmp = final.with_name(final.name + ".tmp")
        if not final.exists() and tmp in paths and problem(tmp) is None:
            os.replace(tmp, final)
        if problem(final) is None:
            shutil.rmtree(final.with_name(final.name + ".old"), ignore_errors=True)


def val_score(val: dict) -> dict | None:
    """What ranks a checkpoint for `best`: the val SRCC of the EMA weights (else the student's) from that step's
    evaluation; None for an evaluation on another split (choosing on test would flatter its numbers) or a NaN."""
    key = next((k for k in ("val/ema/srcc", "val/student/srcc") if k in val), None)
    return {"key": key, "value": val[key]} if key and math.isfinite(val[key]) else None


def best(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest validation score recorded at its step (ckpt.keep_best), if any."""
    scored = []
    for step, p in valid_checkpoints(run_dir):
        score = json.loads((p / INFO).read_text()).get("val_score")
        if score is not None:
            scored.append((score["value"], step, p))
    return max(scored)[2] if scored else None


def resolve(path: Path, option: str) -> Path:
    """A step-N checkpoint as given, RUN/best (the best validation score kept), or a run folder's newest intact one;
    `option` names the flag in errors. Whichever way it is named, its files are checked against their sha256
    before it is used (a damaged checkpoint given by name is refused, never read)."""
    path = Path(path)
    if path.is_symlink() and path.exists():  # RUN/best: the step it names, so records and messages say which
        path = path.resolve()
    if path.name == BEST and not path.exists() and path.parent.is_dir():
        found = best(path.parent)
        if found is None:
            raise DataError(
                f"{option}: {path.parent} has no checkpoint with a validation score; they are recorded where "
                f"an evaluation on val falls on a checkpoint step (eval.every, ckpt.every, ckpt.keep_best)"
            )
    elif not path.exists():
        raise DataError(f"{option}: {path} does not exist; give a step-N checkpoint or a run folder")
    elif (path / MARKER).is_file():
        found = path
    else:
        found = latest(path)  # checks sha256 itself, skipping damaged newer ones
        if found is None:
            inside = sorted(str(d) for d in path.glob("*") if d.is_dir() and valid_checkpoints(d))
            hint = f"; its run folders are {inside} (a pipeline row keeps its stages in ssl/ and retrain/)"
            raise DataError(
                f"{option}: {path} holds no complete checkpoint (step-N folder with {MARKER}){hint if inside else ''}"
            )
        return found
    why = problem(found, deep=True)
    if why is not None:
        raise DataError(f"{option}: {found}: {why}; name an intact checkpoint (or the run folder: its newest intact)")
    return found


def _write(tmp: Path, step: int, state: dict, info: dict) -> None:
    buf = io.BytesIO()  # serialised in memory first: torch's zip writer turns a full disk into a RuntimeError
    torch.save(state, buf)
    fsio.write_bytes(tmp / STATE, buf.getbuffer())
    fsio.write_json(tmp / INFO, info)
    files = {n: {"size": (tmp / n).stat().st_size, "sha256": fsio.sha256_file(tmp / n)} for n in (STATE, INFO)}
    fsio.write_text(tmp / MARKER, json.dumps({"step": step, "files": files}) + "\n")


def save(run_dir: Path, step: int, state: dict, info: dict, keep: int, keep_best: bool = False) -> Path:
    """Write one checkpoint (main process only), then prune to the newest `keep` valid ones, and with `keep_best`
    the one with the best `val_score` in its info beside them.

    Order: the new one complete under step-N.tmp; an existing step-N renamed to step-N.old; step-N.tmp renamed to
    step-N; the old one deleted. Pruning renames before deleting, too. Disk full: the partial .tmp is removed and
    the error says how much room a checkpoint needs (keep + 1 of them exist for a moment)."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / f"step-{step}", run_dir / f"step-{step}.tmp", run_dir / f"step-{step}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, step, state, info)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        found = valid_checkpoints(run_dir)
        need = sum(f.stat().st_size for f in found[-1][1].iterdir()) if found else None
        size = f"about {need / 2**20:.1f} MiB" if need else "as much as the model, optimizer and EMA states"
        raise DataError(
            f"{run_dir}: no space left on the device while saving step {step}; a checkpoint needs {size} "
            f"(ckpt.keep={keep} plus one while saving). The previous checkpoints are intact: free space "
            f"or lower ckpt.keep, then resume with --resume auto"
        ) from None
    if final.exists():  # the same step saved again (over a damaged one, or after a resume from an older one)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        faults.inject(0, step, where="RESAVE")  # tests: a kill between the two renames
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    spare = best(run_dir) if keep_best else None
    for _, stale in valid_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if stale == spare:
            continue
        doomed = stale.with_name(stale.name.split(".")[0] + ".pruned")
        os.replace(stale, doomed)  # never a step-N name on a half-deleted folder
        shutil.rmtree(doomed, ignore_errors=True)
    if spare is not None:
        _link_best(run_dir, spare)
    return final


def _link_best(run_dir: Path, target: Path) -> None:
    """RUN/best: a relative symlink to the best-scored kept checkpoint, so `ls` and tab completion find it (swapped
    in by a rename; a real file or folder of that name is left alone)."""
    link, tmp = run_dir / BEST, run_dir / f".{BEST}.tmp"
    if link.exists() and not link.is_symlink():
        return
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def load(path: Path) -> tuple[dict, dict]:
    """(state, trainer info) of a checkpoint directory. The state is loaded as data only (`weights_only`): a file
    that needs code to load is refused, never run."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such checkpoint directory")
    why = problem(path)
    if why:
        raise DataError(f"{path}: not a usable checkpoint ({why})")
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(
            f"{path / STATE}: refused: it holds objects other than tensors and plain values, and "
            f"sslfw never runs code from a checkpoint ({str(e).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise DataError(
            f"{path / STATE}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); use an older checkpoint"
        ) from None
    return state, fsio.read_json(path / INFO, "name another checkpoint")


# What a training checkpoint holds ------------------------------------------------------------------------------


class Stateful(Protocol):  # what torch modules, optimizers, the algorithms and the EMA teacher all are
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


class Checkpointer:
    """Saves and restores every stateful part a run registers (torchtitan's pattern), with the trainer info beside
    them. Per-rank RNG and stream positions are functions of (seed, rank, step), so the step pins them all."""

    def __init__(self, run_dir: Path, ckpt_cfg, main: bool, parts: dict[str, Stateful | None], **info: Any):
        self.run_dir, self.cfg, self.main, self.parts = Path(run_dir), ckpt_cfg, main, parts
        self.info = info  # seed, world_size, grad_accum, config: fixed for the run

    def restore(self, state: dict) -> None:
        for name, part in self.parts.items():
            if part is not None:
                part.load_state_dict(state[name])

    def save(self, step: int, skipped: int, val: dict | None) -> None:
        """Every rank calls it; the main process writes. `val`: this step's evaluation, which ranks it for RUN/best."""
        if self.main:
            state = {name: part.state_dict() if part is not None else None for name, part in self.parts.items()}
            info = {
                "step": step,
                "seed": self.info["seed"],
                "world_size": self.info["world_size"],
                "skipped_steps": skipped,
                "stream_position": step * self.info["grad_accum"],
                "rng": "reseeded each step from (seed, rank, step)",
                "lr_schedule": "warmup+cosine, a function of step (optim config)",
                "config": self.info["config"],
                "data": self.info.get("data"),  # what it trained on (shards.identity): resume and eval check it
            }
            if val and (score := val_score(val)):
                info["val_score"] = score
            save(self.run_dir, step, state, info, self.cfg.keep, self.cfg.keep_best)
        barrier()


@dataclass
class Saved:
    """A checkpoint read back: its folder, state and trainer info."""

    path: Path
    state: dict
    info: dict

    @property
    def step(self) -> int:
        return int(self.info.get("step", 0))

    @property
    def skipped_steps(self) -> int:
        return int(self.info.get("skipped_steps", 0))

    @property
    def config(self) -> dict:
        """The resolved config it was trained with (runs older than sslfw 0.2 kept it only in RUN/config.yaml;
        train.bf16 became train.precision)."""
        cfg = (
            self.info["config"]
            if "config" in self.info
            else fsio.read_yaml(self.path.parent / "config.yaml", "the run's config")
        )
        train = dict(cfg.get("train", {}))
        if "bf16" in train:
            train["precision"] = "auto" if train.pop("bf16") else "no"
        return {**cfg, "train": train}

    def weights(self, which: str) -> dict:
        """The EMA teacher's ("ema") or the student's ("student") model weights."""
        if which == "ema":
            if not self.state.get("ema"):
                raise DataError(
                    f"{self.path} has no EMA teacher (trained with ema.enabled=false); use --weights student"
                )
            return self.state["ema"]["module"]
        if which == "student":
            return self.state["model"]
        raise ValueError(f"weights must be 'ema' or 'student', got {which!r}")


def info(path: Path) -> dict:
    """A checkpoint's trainer info (step, config, data...) without loading its state."""
    return fsio.read_json(Path(path) / INFO, "name another checkpoint")


def recorded_data(path: Path) -> dict | None:
    """The data identity a checkpoint recorded (shards.identity), None for checkpoints older than the record."""
    return info(path).get("data")


def read(path: Path, option: str) -> Saved:
    """The checkpoint `path` names (a step-N folder, RUN/best or a run folder), checked against its sha256, loaded."""
    found = resolve(path, option)
    return Saved(found, *load(found))


# Which checkpoint a training start continues from ----------------------------------------------------------------

ARCHITECTURE = ("model.name", "model.kwargs", "model.img_size", "model.proj_dim", "algorithm.name")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def resolve_resume(run_dir: Path, resume: str, config: dict, main: bool) -> Path | None:
    """The checkpoint a start continues from (None: a fresh start), after refusing what would mix two runs."""
    if resume == "auto":
        path = latest(run_dir, verbose=main)
        return _same_architecture(path, config) if path else None
    if resume == "none":
        found = valid_checkpoints(run_dir)
        if found:
            raise DataError(
                f"{run_dir}: holds checkpoints up to step {found[-1][0]}, and --resume none would train "
                f"over them. Resume with --resume auto, choose another run_dir, or add "
                f"--ckpt.overwrite=true to move the old run aside"
            )
        return None
    return _same_architecture(resolve(Path(resume), "ckpt.resume"), config)


def _same_architecture(path: Path, config: dict) -> Path:
    """`path`, if the checkpoint was trained with this model and algorithm (also for folders from before run.json)."""
    theirs = info(path).get("config", {}) if (path / INFO).is_file() else {}
    changed = [
        f"{k}: {_get(theirs, k)!r} -> {_get(config, k)!r}"
        for k in ARCHITECTURE
        if theirs and _get(theirs, k) != _get(config, k)
    ]
    if changed:
        raise DataError(
            f"ckpt.resume: {path} was trained with another architecture ({'; '.join(changed)}); "
            f"resume with the config it was trained with"
        )
    return path
