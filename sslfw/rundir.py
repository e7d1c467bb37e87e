"""A run folder has one owner: its identity is written by the run that made it, and a lock keeps a second process
from writing into it while the first is alive.

Identity: the resolved config minus what a resumed run may change (how long it trains, how often it evaluates,
logs or saves, how many loader workers it uses, where it lives). A start whose identity differs, or `--resume none`
over existing checkpoints, is refused with exit 2; `--ckpt.overwrite=true` moves the old run aside (never deletes
it). The lock is an fcntl lock on RUN_DIR/.lock: the kernel drops it when its holder dies, even by kill -9.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from sslfw import ckpt, fsio
from sslfw.dist import any_across_ranks, barrier
from sslfw.errors import DataError

IDENTITY = "run.json"
LOCK = ".lock"
# Dotted keys (or whole sections) a resumed run may change without becoming another run.
RESUMABLE = (
    "run_dir",
    "train.steps",
    "train.log_every",
    "train.max_nonfinite",
    "data.num_workers",
    "data.eval_batch_size",
    "eval",
    "ckpt",
    "log",
)


def identity(config: dict) -> dict:
    """The part of a resolved config (`to_dict`) that defines a run, with its sha256."""
    ident = json.loads(json.dumps(config))
    for key in RESUMABLE:
        *parents, last = key.split(".")
        node = ident
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "config": ident}


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def check_owner(run_dir: Path, config: dict) -> None:
    """Refuse to continue a run folder made by a run with another identity."""
    path = Path(run_dir) / IDENTITY
    if not path.is_file():
        return
    theirs = fsio.read_json(path, "it records which run owns this folder: restore it, or choose another run_dir")
    mine = identity(config)
    if theirs["sha256"] != mine["sha256"]:
        diff = "; ".join(differences(theirs["config"], mine["config"])[:4])
        raise DataError(
            f"{run_dir}: holds another run ({diff}). Choose another run_dir, or add "
            f"--ckpt.overwrite=true to move that run aside"
        )


def write_owner(run_dir: Path, config: dict) -> None:
    if not (Path(run_dir) / IDENTITY).is_file():
        fsio.write_json(Path(run_dir) / IDENTITY, identity(config))


def move_aside(run_dir: Path) -> Path:
    """Rename run_dir to a free sibling `NAME.replaced-YYYYmmdd-HHMMSS`; returns the new path."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    os.replace(run_dir, target)
    return target


class FolderLock:
    """An exclusive lock on FOLDER/.lock for the life of a job (or until `release`), naming its holder."""

    def __init__(self, folder: Path, what: str):
        self.path = Path(folder) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise DataError(f"{folder}: in use by {holder}; wait for it to finish or choose another folder") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{what} (pid {os.getpid()}, host {os.uname().nodename})\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def claim(
    run_dir: str | Path, ckpt_cfg, config: dict, main: bool, device
) -> tuple[Path | None, FolderLock | None, bool]:
    """Take RUN_DIR for a training start: (checkpoint to resume from or None, the lock on the main process, whether
    this start made the folder). Refusals (another run's folder, --resume none over checkpoints, another
    architecture, a live trainer) are DataErrors raised on every rank alike, before anything is written."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DataError(f"run_dir: {run_dir} is a file; give a folder")
    if ckpt_cfg.overwrite and main and run_dir.is_dir() and any(run_dir.iterdir()):
        print(f"[sslfw] ckpt.overwrite: moved the old run to {move_aside(run_dir)}", flush=True)
    barrier()
    check_owner(run_dir, config)
    created = not run_dir.exists()
    lock = lock_on_main(run_dir, f"sslfw train (run_dir {run_dir})", main, device)
    try:
        if main:  # with the folder locked, finish what a kill during a re-save left
            ckpt.tidy(run_dir)
        barrier()
        resume_from = ckpt.resolve_resume(run_dir, ckpt_cfg.resume, config, main)
    except Exception:
        if lock is not None:
            lock.release()
        if main and created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return resume_from, lock, created


def lock_on_main(folder: Path, what: str, main: bool, device) -> FolderLock | None:
    """The main process locks `folder` for a job; every rank raises the same DataError when it is taken."""
    lock, busy = None, ""
    if main:
        try:
            lock = FolderLock(folder, what)
        except DataError as e:
            busy = str(e)
    if any_across_ranks([bool(busy)], device)[0]:
        raise DataError(busy or f"{folder}: in use by another job (see the main process's message)")
    return lock
