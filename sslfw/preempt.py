"""Preemption: how a stop request travels from Slurm to a checkpoint and back to Slurm.

Slurm (or a user) signals the launcher; `PET_SIGNALS_TO_HANDLE` makes torchrun/accelerate forward it to every worker;
a worker's handler only sets a StopFlag; the loop acts on it at a step or chunk boundary, in agreement across ranks,
saves, and exits with EXIT_PREEMPTED. Launchers replace worker exit codes with their own, so the global rank 0 also
writes the code to $SSLFW_EXIT_FILE, which the sbatch scripts read to decide whether to requeue.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from sslfw import fsio

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: state was saved on request; requeue and resume
EXIT_NONFINITE = 3  # stopped after train.max_nonfinite non-finite steps in a row
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C after saving (128 + SIGINT, the shell's convention); resume to go on
EXIT_FILE_ENV = "SSLFW_EXIT_FILE"
HISTORY = "history.jsonl"  # one row per start and end of a training process: the run's audit trail over requeues


class StopFlag:
    """Signal handlers may only set this; the loop acts on it at a boundary, in agreement across ranks.

    Ctrl-C (SIGINT) is a stop request too: the first one saves at the next boundary (exit EXIT_INTERRUPTED); the
    handler then steps aside, so a second Ctrl-C raises KeyboardInterrupt and aborts at once."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)) -> None:
        self.signal: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, _frame) -> None:
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print(
                "\n[sslfw] Ctrl-C: stopping at the next boundary after saving; press Ctrl-C again to abort now",
                file=sys.stderr,
                flush=True,
            )

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signal == "SIGINT" else EXIT_PREEMPTED

    def restore(self) -> None:
        """Give the process its old handlers back (a command may run inside a longer-lived process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_exit_file(code: int) -> None:
    """On the global rank 0 only (RANK unset or 0): the command's real exit code, for the sbatch script."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fsio.write_text(Path(path), f"{int(code)}\n")


def record(run_dir: Path, event: str, step: int, **extra) -> None:
    """Append to run_dir/history.jsonl (main process): starts and ends with their steps show that a run that was
    stopped and requeued trained every step exactly once."""
    row = {
        "event": event,
        "step": step,
        "time": round(time.time(), 3),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        **extra,
    }
    with open(Path(run_dir) / HISTORY, "a") as f:
        f.write(json.dumps(row) + "\n")
