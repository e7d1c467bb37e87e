"""The README's quick start runs as written, in order, on the data the main job leaves (shards/demo-seed0,
data/demo/seed0): every command a new user copies after `sslfw demo` works. A small demo dataset stands in for the
full one, and training is cut to a few steps; the commands are otherwise the README's own."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from tests.helpers import ROOT, run_sslfw


def quickstart_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```\n<!-- /quickstart -->", text, re.S)
    assert block, "README.md lost its quickstart block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.slow  # builds a demo dataset and trains
def test_the_readme_quick_start_runs_in_order_after_the_main_job(tmp_path, monkeypatch):
    from sslfw.commands import demo

    monkeypatch.setattr(demo, "KONIQ_COUNT", 200)
    monkeypatch.setattr(demo, "KADIS_COUNT", 60)
    monkeypatch.chdir(tmp_path)
    demo.build_data(0, tmp_path / "data" / "demo", tmp_path / "shards")  # what `sslfw demo` leaves for seed 0
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    fast = ["--train.steps=4", "--eval.every=2", "--ckpt.every=2", "--data.num_workers=0", "--log.wandb=disabled"]
    for argv in quickstart_commands():
        assert argv[0] == ".venv/bin/sslfw", argv
        args = argv[1:] + (fast if argv[1] == "train" else [])
        proc = run_sslfw(args, cwd=tmp_path)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    assert (tmp_path / "runs" / "quick" / "eval" / "eval.json").is_file()
    assert (tmp_path / "runs" / "quick" / "levels.csv").read_text().count("\n") == 1 + 60  # every KADIS image
