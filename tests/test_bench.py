"""`sslfw bench` runs every benchmark end to end on real shards and writes its tables (no timing is asserted)."""

from __future__ import annotations

import json
import math

import torch

from sslfw.cli import main
from tests.helpers import tiny_overrides


def test_bench_all_writes_every_table_with_finite_ratios(small_shards, tmp_path):
    overrides = [o for o in tiny_overrides(small_shards, tmp_path / "unused") if not o.startswith("--run_dir")]
    assert (
        main(
            [
                "bench",
                "all",
                "--reps",
                "1",
                "--steps",
                "1",
                "--batches",
                "2",
                "--workers",
                "0,1",
                "--chunk",
                "16",
                "--out",
                str(tmp_path / "b"),
                *overrides,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    titles = [t["title"].split(":")[0] for t in report["tables"]]
    assert titles == ["data", "augment", "step", "step speed-ups", "pseudolabel"]
    step = report["tables"][2]
    assert [r[0] for r in step["rows"]] == [
        "supervised",
        "fixmatch",
        "adamatch",
        "freematch",
        "comatch",
        "simmatch",
        "crmatch",
    ]
    cols = [next(i for i, c in enumerate(t["columns"]) if "ratio" in c or " / " in c) for t in report["tables"]]
    ratios = [r[c] for t, c in zip(report["tables"], cols) for r in t["rows"]]
    assert len(ratios) == 3 + 3 + 2 + 7 + 3 + 3  # data: + the stream with JPEG left to the device, its decode rate
    assert report["tables"][0]["rows"][-1][0] == "batched JPEG decode + crop on cpu"
    speedups = report["tables"][3]["rows"]
    assert [r[0].split(":")[0] for r in speedups] == ["before", "+ weak view without autograd", "+ fused AdamW"]
    assert [r[-1] for r in speedups] == ["no", "yes", "yes"]  # the tiny ViT has no BatchNorm: its weak view can
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in ratios)
    assert "| supervised |" in (tmp_path / "b" / "bench.md").read_text()
    gflop, mfu = (step["columns"].index(c) for c in ("GFLOP/step", "MFU"))
    flops = {r[0]: r[gflop] for r in step["rows"]}
    assert flops["supervised"] > 0 and flops["fixmatch"] > 2 * flops["supervised"]  # 3 views through the model
    assert all(0 < r[mfu] < 1.5 for r in step["rows"])  # a share of the measured matmul rate (noise allowed)
    assert "MFU: counted model FLOPs" in step["notes"][0]
    assert main(["bench", "data,nonsense", *overrides]) == 2  # a typo is a clear error, not a crash

    # compare: an earlier version's run (no MFU columns, no speed-ups table, FixMatch's step twice as slow) vs this one
    before = json.loads((tmp_path / "b" / "bench.json").read_text())
    old = before["tables"][2]
    keep = [i for i, c in enumerate(old["columns"]) if c not in ("GFLOP/step", "TFLOP/s", "MFU")]
    ms = old["columns"].index("step ms")
    old["rows"] = [[2 * c if (i, r[0]) == (ms, "fixmatch") else c for i, c in enumerate(r)] for r in old["rows"]]
    old["rows"], old["columns"] = [[r[i] for i in keep] for r in old["rows"]], [old["columns"][i] for i in keep]
    del before["tables"][3]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bench.json").write_text(json.dumps(before))
    b = str(tmp_path / "b")
    assert main(["bench", "compare", "--before", str(tmp_path / "a"), "--after", f"{b},{b}", "--out", b + "c"]) == 0
    cmp = {t["title"].split(":")[0]: t for t in json.loads((tmp_path / "bc" / "bench.json").read_text())["tables"]}
    assert list(cmp) == titles
    cells = {(r[0], r[1]): r[2:] for r in cmp["step"]["rows"]}
    now = step["rows"][1][ms]
    assert cells[("fixmatch", "step ms")] == [2 * now, now, 0.5]  # median of two identical runs
    assert cells[("supervised", "step ms")][2] == 1
    assert cells[("fixmatch", "MFU")][0] == "-" and cells[("fixmatch", "MFU")][1] == step["rows"][1][mfu]
    assert ("comatch", "bank+stats sync ms") not in cells  # zero on both sides (one process)
    assert [r[4] for r in cmp["data"]["rows"] if r[0] == "shard stream -> uint8 batches / 0 (in process)"] == [1] * 3
    assert cmp["step speed-ups"]["notes"] == ["the earlier version has no such benchmark"]
    assert main(["bench", "compare", "--before", str(tmp_path / "none"), "--after", b]) == 2  # names the file


def test_bench_step_runs_the_trainers_own_step(small_shards, tmp_path):
    """Whatever the trainer's step does (here: gradient clipping) is what the benchmark times."""
    from sslfw.bench.compute import Harness, _setup
    from sslfw.runconfig import load_config

    def weights_after_two_steps(clip: float) -> torch.Tensor:
        cfg = load_config(None, tiny_overrides(small_shards, tmp_path / "unused", **{"optim.clip_grad": clip}))
        acc, raw = _setup(cfg, str(small_shards))
        h = Harness(cfg, "fixmatch", acc, raw)
        h.steps(2)
        return torch.cat([p.detach().flatten() for p in h.run.raw_model.parameters()])

    free, clipped, again = weights_after_two_steps(0.0), weights_after_two_steps(1e-6), weights_after_two_steps(0.0)
    assert torch.equal(free, again) and not torch.allclose(free, clipped)
