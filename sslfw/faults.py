"""Fault injection for the tests: real faults (SIGKILL, a signal, a NaN) at chosen points, never mocks.

SSLFW_FAULT_<NAME>="rank:step,rank:step" arms fault NAME on that rank at that step (or chunk); unset, nothing
happens.
"""

from __future__ import annotations

import os


def armed(name: str, rank: int, step: int) -> bool:
    return f"{rank}:{step}" in os.environ.get(f"SSLFW_FAULT_{name}", "").split(",")
