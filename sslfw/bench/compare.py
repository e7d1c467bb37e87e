"""`sslfw bench compare`: one before/after table from bench.json folders of two code versions run on one machine.

launch/bench_before_after.sh runs the same benchmarks from an older commit and from this tree in alternating rounds;
this reads their bench.json files, matches tables by benchmark and rows by their leading labels, and reports the
median of each measure per side. Measures only the newer version reports (MFU, say) are listed with "-" before.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from sslfw.bench import Table
from sslfw.errors import ConfigError

Rows = dict[tuple[str, ...], dict[str, list[float]]]


def _read(folder: Path) -> dict[str, tuple[str, Rows]]:
    """{benchmark: (title, {row labels: {measure: [value]}})} from one bench.json; a row's labels are its cells before
    the first float (path, workers), its measures the numeric cells that are floats in some row of the table."""
    path = folder / "bench.json"
    try:
        tables = json.loads(path.read_text())["tables"]
    except (OSError, ValueError, KeyError) as e:
        msg = f"{path}: not a bench.json of `sslfw bench --out` ({e.__class__.__name__}); run the benchmark first"
        raise ConfigError(msg) from None
    out: dict[str, tuple[str, Rows]] = {}
    for t in tables:
        floats = {i for row in t["rows"] for i, c in enumerate(row) if isinstance(c, float)}
        first = min(floats, default=len(t["columns"]))
        rows: Rows = {}
        for row in t["rows"]:
            measures = rows.setdefault(tuple(str(c) for c in row[:first]), {})
            for i in sorted(floats):
                if isinstance(row[i], (int, float)) and not isinstance(row[i], bool):
                    measures.setdefault(t["columns"][i], []).append(float(row[i]))
        out[t["title"].split(":")[0]] = (t["title"], rows)
    return out


def _pool(folders: list[Path]) -> dict[str, tuple[str, Rows]]:
    """Every folder's values side by side (one list per cell), so each cell's median is over the rounds."""
    pooled: dict[str, tuple[str, Rows]] = {}
    for folder in folders:
        for bench, (title, rows) in _read(folder).items():
            _, into = pooled.setdefault(bench, (title, {}))
            for key, measures in rows.items():
                for name, values in measures.items():
                    into.setdefault(key, {}).setdefault(name, []).extend(values)
    return pooled


def compare(before: list[Path], after: list[Path]) -> list[Table]:
    """A table per benchmark of the newer version: each row and measure, median before, median after, after/before."""
    old, new = _pool(before), _pool(after)
    tables = []
    for bench, (title, rows) in new.items():
        t = Table(
            f"{title} -- before/after, medians of {len(before)} and {len(after)} run(s)",
            ["row", "measure", "before", "after", "after / before"],
        )
        old_rows = old.get(bench, ("", {}))[1]
        for key, measures in rows.items():
            for name, values in measures.items():
                was = old_rows.get(key, {}).get(name)
                b, a = (statistics.median(was) if was else None), statistics.median(values)
                if a == 0 and not b:  # nothing on either side (a single process's sync time): no row
                    continue
                t.add(" / ".join(key), name, "-" if b is None else b, a, a / b if b else "-")
        if bench not in old:
            t.notes.append("the earlier version has no such benchmark")
        tables.append(t)
    return tables
