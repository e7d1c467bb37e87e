"""Fault injection for the tests: real faults (SIGKILL, a stop signal, a NaN loss) at chosen points, never mocks.

SSLFW_FAULT_<NAME>="rank:at,rank:at" arms fault NAME on that rank when the job reaches `at` (the 0-based index of
the optimizer step being computed, or of the pseudo-label chunk just written); unset, nothing happens. The loop
calls `inject` once per point, whatever faults exist. With SSLFW_FAULT_ONCE=FILE a fault fires only while FILE does
not exist (it is created first): a job that a launcher restarts (torchrun --max-restarts) is not killed again when
it replays the step.
"""

from __future__ import annotations

import os
import signal

import torch


def _armed(name: str, rank: int, at: int) -> bool:
    if f"{rank}:{at}" not in os.environ.get(f"SSLFW_FAULT_{name}", "").split(","):
        return False
    once = os.environ.get("SSLFW_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: only the first arrival fires
        except FileExistsError:
            return False
    return True


def inject(rank: int, at: int, loss: torch.Tensor | None = None, where: str = "") -> torch.Tensor | None:
    """KILL: SIGKILL this process now. SIGNAL: deliver SIGUSR1 now, as Slurm's warning would (the job stops at its
    next boundary). NAN: return `loss` made non-finite, so its gradients are NaN too. Returns `loss` otherwise.
    `where` names a point other than the loop's own (KILL_RESAVE: between the renames of a checkpoint re-save)."""
    if _armed(f"KILL_{where}" if where else "KILL", rank, at):
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed("SIGNAL", rank, at):
        signal.raise_signal(signal.SIGUSR1)
    if loss is not None and _armed("NAN", rank, at):
        return loss * float("nan")
    return loss
