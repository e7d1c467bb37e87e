"""`sslfw bench data|augment|step|pseudolabel|all`: throughput measured side by side in one run, as ratios.

Each benchmark times the sslfw path and its reference (the physical limit or the simpler alternative) in the same
process, alternating them over several repetitions and reporting medians, so a noisy machine moves both alike.
Results print as a markdown table and, with --out, are saved as JSON and markdown beside the machine description.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sslfw import fsio


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each fn over `reps` rounds; the fns alternate within a round (same machine state), in an
    order rotated every round.
    A fn with untimed set-up inside times itself and returns its seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotated: no path always goes first
            fn = fns[name]
            sync()
            t0 = time.perf_counter()
            own = fn()
            sync()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class Table:
    """Rows of one benchmark: what, throughput, ratio to the reference, and a target where the issue sets one."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        fmt = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in self.rows]
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)] + [
            "| " + " | ".join(r) + " |" for r in fmt
        ]
        return "\n".join(lines + ([""] + [f"- {n}" for n in self.notes] if self.notes else []))


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host": platform.node(),
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def save(out: Path, tables: list[Table], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fsio.write_json(
        out / "bench.json",
        {
            "machine": machine(),
            **meta,
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows, "notes": t.notes} for t in tables],
        },
    )
    fsio.write_text(out / "bench.md", "\n\n".join(t.markdown() for t in tables) + "\n")
