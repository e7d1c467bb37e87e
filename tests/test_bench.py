"""`sslfw bench` runs every benchmark end to end on real shards and writes its tables (no timing is asserted)."""

from __future__ import annotations

import json
import math

from sslfw.cli import main
from tests.conftest import tiny_overrides


def test_bench_all_writes_every_table_with_finite_ratios(small_shards, tmp_path):
    overrides = [o for o in tiny_overrides(small_shards, tmp_path / "unused") if not o.startswith("--run_dir")]
    assert main(["bench", "all", "--reps", "1", "--steps", "1", "--batches", "2", "--workers", "0,1", "--chunk", "16",
                 "--out", str(tmp_path / "b"), *overrides]) == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    titles = [t["title"].split(":")[0] for t in report["tables"]]
    assert titles == ["data", "augment", "step", "pseudolabel"]
    step = report["tables"][2]
    assert [r[0] for r in step["rows"]] == ["supervised", "fixmatch", "adamatch", "freematch", "comatch", "simmatch",
                                            "crmatch"]
    cols = [next(i for i, c in enumerate(t["columns"]) if "ratio" in c or " / " in c) for t in report["tables"]]
    ratios = [r[c] for t, c in zip(report["tables"], cols) for r in t["rows"]]
    assert len(ratios) == 3 + 2 + 7 + 3
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in ratios)
    assert "| supervised |" in (tmp_path / "b" / "bench.md").read_text()
    assert main(["bench", "data,nonsense", *overrides]) == 2  # a typo is a clear error, not a crash
