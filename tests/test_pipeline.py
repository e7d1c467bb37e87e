"""Pseudo-labelling, evaluation, prediction and the whole pipeline, on real shards and checkpoints."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from sslfw import ckpt
from sslfw.cli import main
from sslfw.commands.pipeline import PipelineConfig, run_pipeline
from sslfw.config import parse_config
from sslfw.data.shards import load_index
from sslfw.data.stream import tile_crops
from sslfw.errors import ConfigError, DataError
from sslfw.runconfig import load_config
from tests.helpers import base_yaml, make_raw, run_sslfw


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_pseudolabel_two_ranks_cover_the_pool_exactly_once(tiny_run, small_shards, tmp_path):
    pool = load_index(small_shards)["sets"]["unlabelled"]
    assert len(pool["shards"]) < 2 * 3  # fewer shards than ranks x workers
    out = tmp_path / "pseudo.csv"
    args = f"pseudolabel --checkpoint {tiny_run} --out {out} --num-workers 3 --chunk 16 --quiet".split()
    proc = run_sslfw(args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(out)
    assert [int(r["idx"]) for r in rows] == list(range(pool["count"]))
    assert len({r["key"] for r in rows}) == pool["count"]
    probs = np.array([[float(r[f"p{k}"]) for k in range(5)] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert all(int(r["label"]) == int(np.argmax(p)) for r, p in zip(rows, probs))
    assert np.allclose([float(r["score"]) for r in rows], probs @ np.arange(5), atol=1e-4)


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_pseudolabel_resumes_after_a_kill_without_duplicates(tiny_run, tmp_path, capsys):
    out = tmp_path / "pseudo.csv"
    args = f"pseudolabel --checkpoint {tiny_run} --out {out} --num-workers 0 --chunk 16 --quiet --crops 5".split()
    killed = run_sslfw(args, env={"SSLFW_FAULT_KILL": "0:1"})  # SIGKILL after chunks 0 and 1 are written
    assert killed.returncode == -9 and not out.exists()
    assert len(list(Path(str(out) + ".parts").glob("chunk-*.npz"))) == 2
    resumed = run_sslfw(args, nproc=2)  # resumed with a different number of ranks
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '"chunks_reused": 1' in resumed.stdout  # rank 0 owns chunks 0, 2, 4: chunk 0 was already there
    idx = [int(r["idx"]) for r in read_csv(out)]
    assert idx == sorted(set(idx)) and len(idx) == 74
    capsys.readouterr()  # a refusal needs no process of its own
    assert main(["pseudolabel", "--checkpoint", str(tiny_run), "--out", str(out), "--weights", "student",
                 "--chunk", "16", "--quiet"]) == 2  # fmt: skip
    assert "holds chunks of another job" in capsys.readouterr().err


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_eval_writes_json_markdown_and_confusion_png(tiny_run, small_shards, tmp_path):
    proc = run_sslfw(
        ["eval", "--checkpoint", str(tiny_run), "--split", "test", "--out", str(tmp_path / "e"), "--crops", "5"],
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    m = result["metrics"]
    assert m["n"] == load_index(small_shards)["sets"]["test"]["count"]
    assert {"mae", "const_mae", "macro_mae", "qwk", "accuracy", "mae_class34"} <= set(m)
    assert "| mae |" in (tmp_path / "e" / "eval.md").read_text()
    assert (tmp_path / "e" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_scores_whole_images_skips_unreadable_files_and_fails_only_when_none_scored(
    tiny_run, small_raw, tmp_path, capsys
):
    folder = tmp_path / "photos"
    shutil.copytree(small_raw / "kadis700k" / "ref_imgs", folder)
    (folder / "notes.jpg").write_text("not a picture")
    out = tmp_path / "p.csv"
    argv = ["predict", "--checkpoint", str(tiny_run), str(folder), "--out", str(out), "--batch_size=4", "--device=cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"{folder / 'notes.jpg'}: not an image Pillow can read" in err and "scored 80, skipped 1" in err
    assert "BytesIO" not in err  # the file is named, not Pillow's in-memory buffer
    rows = read_csv(out)
    assert len(rows) == 80 and all(0 <= int(r["level"]) <= 4 and 0 <= float(r["score"]) <= 4 for r in rows)
    centres = np.array([1.395, 2.17, 3.005, 3.7, 4.47])  # the MOS-interval centres of the default edges
    for r in rows:  # MOS units beside the level: the probabilities times each level's MOS centre
        assert float(r["mos"]) == pytest.approx(np.array([float(r[f"p{k}"]) for k in range(5)]) @ centres, abs=2e-3)
    # 64x48 photos, 32 px views: tiles cover the whole image (2 x 2), centre crop is one view
    assert {r["views"] for r in rows} == {"4"}
    assert main([*argv[:-2], "--crops", "1", "--out", str(tmp_path / "c.csv")]) == 0
    assert {r["views"] for r in read_csv(tmp_path / "c.csv")} == {"1"}
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tiny_run), str(folder / "notes.jpg")]) == 2  # nothing scored
    err = capsys.readouterr().err.strip().splitlines()  # one file, nothing scored: the usual one-line error
    assert len(err) == 1 and err[0].startswith(f"sslfw: error: {folder / 'notes.jpg'}: not an image Pillow can")


def test_tiles_cover_every_pixel_at_native_resolution():
    img = np.arange(50 * 70 * 3, dtype=np.int64).reshape(50, 70, 3).astype(np.uint8)
    tiles = tile_crops(img, (32, 32))
    assert tiles.shape == (2 * 3, 32, 32, 3)  # ceil(50/32) x ceil(70/32)
    assert np.array_equal(tiles[0], img[:32, :32]) and np.array_equal(tiles[-1], img[-32:, -32:])
    assert tile_crops(img[:20, :20], (32, 32)).shape == (1, 32, 32, 3)  # smaller than a view: padded, not resized


def test_pipeline_end_to_end_then_skips_finished_stages(small_shards, small_raw, tmp_path):
    base = base_yaml(small_shards, tmp_path, **{"eval.every": 0})
    cfg = parse_config(
        None,
        {
            "out_dir": str(tmp_path / "out"),
            "base": str(base),
            "algorithms": ["supervised", "fixmatch"],
            "seeds": [0, 1],
            "ssl": {"train.steps": 6, "ckpt.every": 6},
            "retrain": {"train.steps": 4},
            "params": {"fixmatch": {"p_cutoff": 0.5}, "crmatch": {"p_cutoff": 0.9}},  # crmatch's: kept, unused
            "truth": str(small_raw / "synth_truth.csv"),
        },
        cls=PipelineConfig,
    )
    for bad, message in [
        ({"algorithms": ["supervised", "fixmatch", "freematchh"]}, "'freematchh' is not one of"),
        ({"params": {"fixmatch": {"p_cutof": 0.5}}}, "algorithm.params.p_cutof: fixmatch has no"),
        ({"params": {"crmatch": {"p_cutof": 0.5}}}, "algorithm.params.p_cutof: crmatch has no"),  # not run: checked
        ({"params": {"fixmatch": {}, "fixmach": {}}}, "params.fixmach: no algorithm 'fixmach'"),
        ({"policies": ["iqa_safe", "autoaugment"]}, "aug.strong: 'autoaugment' is not one of"),
        ({"ssl": {"algorithm.params.p_cutoff": 0.5}}, "ssl.algorithm.params.p_cutoff: set algori"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):  # before the first stage starts
            run_pipeline(replace(cfg, **bad))
        assert not (tmp_path / "out").exists()
    # The hidden truth of another data seed names the same images (826000000.jpg...): refused before training, as
    # is a truth file without the crowd MOS that checks it.
    other = make_raw(tmp_path / "seed7", seed=7) / "synth_truth.csv"
    rows = read_csv(small_raw / "synth_truth.csv")
    legacy = tmp_path / "legacy_truth.csv"
    with open(legacy, "w", newline="") as f:
        w = csv.DictWriter(f, [k for k in rows[0] if k != "crowd_mos"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    for truth, message in [(other, r"crowd MOS of \d+ of \d+ images differs"), (legacy, "no crowd_mos column")]:
        with pytest.raises(DataError, match=message):
            run_pipeline(replace(cfg, truth=str(truth)))
        assert not (tmp_path / "out").exists()
    run_pipeline(cfg)
    ssl_cfg = {
        name: load_config(tmp_path / "out" / name / "ssl" / "config.yaml").algorithm
        for name in ("supervised-s0", "fixmatch-iqa_safe-s0")
    }
    assert ssl_cfg["fixmatch-iqa_safe-s0"].params["p_cutoff"] == 0.5 and ssl_cfg["supervised-s0"].params == {}
    report = (tmp_path / "out" / "report.md").read_text()
    for png in ("forest.png", "scatter.png", "reliability.png"):  # the report's figures, each a real PNG
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png in report, png
    assert "| constant guess |" in report and "| supervised | 2 |" in report and "| fixmatch (iqa_safe) | 2 |" in report
    rows = read_csv(tmp_path / "out" / "report.csv")
    assert [r["method"] for r in rows] == ["constant guess", "features + ridge", "supervised", "fixmatch (iqa_safe)"]
    assert "±" in rows[2]["mae"] and "±" in rows[2]["srcc"]  # two seeds: mean ± std
    assert float(rows[1]["srcc"]) > 0.3  # the classical reference learns the embedded labels
    for row in rows[1:]:  # per-level recall: the reference from its predictions, the models from predictions.npz
        recall = [float(x) for x in row["recall by level 0/1/2/3/4"].split("/")]
        assert len(recall) == 5 and all(0 <= r <= 1 or np.isnan(r) for r in recall)
    delta = rows[3]["Δsrcc vs supervised [95% CI]"]  # paired over the two seeds and the test images
    d, lo, hi = (float(x) for x in re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", delta).groups())
    assert lo <= d <= hi and delta.endswith(" *") == (lo > 0 or hi < 0)
    for col in ("mask_ratio", "used_acc", "pseudo_acc"):  # SSL diagnostics: mean ± std over seeds, within [0, 1]
        mean = float(rows[3][col].split(" ± ")[0])
        assert 0 <= mean <= 1 and rows[2][col] == "-"
        assert " ± " in rows[3][col] or col == "used_acc"  # a seed whose 6 steps passed no pseudo-label has none
    assert (tmp_path / "out" / "learning_curves.png").is_file() and (tmp_path / "out" / "pseudo_labels.png").is_file()
    assert (tmp_path / "out" / "fixmatch-iqa_safe-s1" / "pseudo.csv").is_file()
    stamp = (tmp_path / "out" / "fixmatch-iqa_safe-s0" / "eval" / "eval.json").stat().st_mtime_ns
    run_pipeline(cfg)  # everything finished: nothing is retrained or re-evaluated
    assert (tmp_path / "out" / "fixmatch-iqa_safe-s0" / "eval" / "eval.json").stat().st_mtime_ns == stamp
    partial = parse_config(
        None,
        {
            "out_dir": str(tmp_path / "out"),
            "base": str(base),
            "report_only": True,
            "algorithms": ["supervised", "fixmatch", "comatch"],
            "seeds": [0, 1],
        },
        cls=PipelineConfig,
    )
    run_pipeline(partial)  # comatch never ran: reported without it, and nothing is trained
    assert [r["method"] for r in read_csv(tmp_path / "out" / "report.csv")] == [
        "constant guess",
        "features + ridge",
        "supervised",
        "fixmatch (iqa_safe)",
    ]
    assert not (tmp_path / "out" / "comatch-iqa_safe-s0").exists()

    def plots() -> str:  # the report's last line: which runs its plots draw
        return (tmp_path / "out" / "report.md").read_text().rsplit("(seeds per method): ", 1)[1]

    figures = "; {}: supervised (2), fixmatch (iqa_safe) (2)"
    assert (
        plots()
        == "learning_curves.png: fixmatch-iqa_safe (2), supervised (2)"
        + "".join(figures.format(png) for png in ("forest.png", "scatter.png", "reliability.png"))
        + ".\n"
    )
    # The plots show the report's runs only, not every run in the folder, and say which
    run_pipeline(replace(partial, algorithms=["fixmatch"], seeds=[1], truth=cfg.truth))
    assert plots() == (
        "learning_curves.png: fixmatch-iqa_safe (1); pseudo_labels.png: fixmatch-iqa_safe (1); "
        "scatter.png: fixmatch (iqa_safe) (1); reliability.png: fixmatch (iqa_safe) (1).\n"
    )  # no supervised row: no forest plot, and the last report's is gone
    assert not (tmp_path / "out" / "forest.png").exists()
    run_pipeline(replace(partial, algorithms=["supervised"], seeds=[0]))  # no truth: no pseudo-label plot left over
    assert (
        plots()
        == "learning_curves.png: supervised (1); scatter.png: supervised (1); reliability.png: supervised (1).\n"
    )
    assert not (tmp_path / "out" / "pseudo_labels.png").exists()


def test_pipeline_with_the_best_val_checkpoint_pseudo_labels_and_evaluates_that_step(small_shards, tmp_path):
    """checkpoint: best: each stage's kept best-val step (RUN/best) pseudo-labels and is evaluated; its files sit beside
    those of the last checkpoint, so one folder holds both choices."""
    every = {"eval.every": 2, "ckpt.every": 2, "ckpt.keep": 1}
    cfg = parse_config(
        None,
        {"out_dir": str(tmp_path / "out"), "base": str(base_yaml(small_shards, tmp_path)), "checkpoint": "best",
         "algorithms": ["supervised", "fixmatch"], "ssl": {"train.steps": 8, **every},
         "retrain": {"train.steps": 6, **every}},
        cls=PipelineConfig,
    )  # fmt: skip
    run_pipeline(cfg)
    d = tmp_path / "out" / "fixmatch-iqa_safe-s0"
    for run, evaluated in ((d / "ssl", d / "eval_ssl-best"), (d / "retrain-best", d / "eval-best")):
        best = ckpt.best(run)
        assert best is not None and json.loads((evaluated / "eval.json").read_text())["checkpoint"] == str(best)
    assert (d / "pseudo-best.csv").is_file() and not (d / "pseudo.csv").exists()
    assert not (d / "eval").exists() and not (d / "retrain").exists()
    assert "ema weights, 1 crop(s), best checkpoint" in (tmp_path / "out" / "report.md").read_text()
    row = read_csv(tmp_path / "out" / "report.csv")[-1]  # the paired interval from eval-best's predictions
    assert row["method"] == "fixmatch (iqa_safe)" and row["Δsrcc vs supervised [95% CI]"].startswith(("+", "-0"))
    run_pipeline(replace(cfg, checkpoint="last"))  # the last step's files beside: nothing is retrained for SSL
    assert (d / "eval" / "eval.json").is_file() and (d / "retrain" / "config.yaml").is_file()
    assert json.loads((d / "eval_ssl" / "eval.json").read_text())["checkpoint"] == str(d / "ssl" / "step-8")


def test_demo_builds_the_few_label_benchmark_per_data_seed_and_resumes(small_shards, tmp_path, monkeypatch):
    """`sslfw demo --seed N --seeds=[...]`: data, manifest and shards named by the data seed (15 % of train labelled,
    the rest in the pool), the pipeline over the given training seeds, and a rerun that rebuilds nothing."""
    from sslfw.commands import demo

    monkeypatch.setattr(demo, "KONIQ_COUNT", 100)
    monkeypatch.setattr(demo, "KADIS_COUNT", 40)
    base = base_yaml(small_shards, tmp_path, **{"eval.every": 0, "log.wandb": "offline"})
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "runs"), "base": str(base),
                                   "algorithms": ["supervised", "fixmatch"], "retrain_stage": False,
                                   "ssl": {"train.steps": 4, "ckpt.every": 4}}))  # fmt: skip
    argv = ["demo", "--seed", "3", "--config", str(cfg), "--data", str(tmp_path / "data"),
            "--shards", str(tmp_path / "shards"), "--seeds=[0,1]"]  # fmt: skip
    assert main(argv) == 0
    index = tmp_path / "shards" / "demo-seed3" / "index.json"
    meta = json.loads((tmp_path / "data" / "seed3" / "manifest" / "meta.json").read_text())
    assert meta["split"]["labelled_fraction"] == 0.15 and meta["counts"]["moved_to_pool"] > 0
    sets = load_index(index.parent)["sets"]
    assert sets["unlabelled"]["count"] > 40  # the pool got the unlabelled part of the train split
    out = tmp_path / "runs" / "data-seed3"
    assert all((out / f"supervised-s{s}" / "eval" / "eval.json").is_file() for s in (0, 1))
    assert "| supervised | 2 |" in (out / "report.md").read_text()
    # retrain_stage: false: the SSL model is the row; nothing is pseudo-labelled or retrained
    assert (out / "fixmatch-iqa_safe-s1" / "eval" / "eval.json").is_file()
    assert not (out / "fixmatch-iqa_safe-s1" / "pseudo.csv").exists()
    assert not (out / "fixmatch-iqa_safe-s1" / "retrain").exists()
    assert "this pipeline ran no retraining" in (out / "report.md").read_text()
    # W&B (offline): each stage a run named after it in the pipeline's group; a report run with the table and images.
    stage_run = next((out / "supervised-s1" / "ssl" / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"supervised-s1/ssl" in stage_run and b"runs/data-seed3" in stage_run  # the group: name and data seed
    report_run = next((out / "wandb_report" / "wandb").glob("offline-run-*"))
    media = {p.parent.name: p for p in (report_run / "files" / "media").rglob("*") if p.is_file()}
    assert "table" in media and "images" in media
    assert "supervised (iqa_safe)" not in media["table"].read_text() and "supervised" in media["table"].read_text()
    stamps = [p.stat().st_mtime_ns for p in (index, out / "supervised-s0" / "eval" / "eval.json")]
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in (index, out / "supervised-s0" / "eval" / "eval.json")] == stamps


def test_eval_with_whole_image_tiles_averages_each_images_tiles(tiny_run, small_shards, tmp_path):
    """--crops 0 (eval, pseudolabel, the pipeline): every test image scored by the tiles that cover it, as predict
    does by default; the probabilities are each image's own tile average."""
    import torch

    from sslfw.commands.evaljob import run_eval
    from sslfw.data.reader import ShardSet, read_image
    from sslfw.inference import load_model

    result = run_eval(tiny_run, "test", "ema", 0, out=tmp_path / "e")
    test = ShardSet(small_shards, "test")
    assert result["metrics"]["n"] == len(test) and result["crops"] == 0
    with np.load(tmp_path / "e" / "predictions.npz") as z:
        idx, probs = z["idx"], z["probs"]
    model, cfg, _ = load_model(tiny_run, "ema")
    img, _ = read_image(test, int(idx[0]), None, None)
    tiles = torch.from_numpy(tile_crops(img, (cfg.model.img_size,) * 2)).movedim(-1, -3).float() / 255
    assert len(tiles) > 1  # 64x48 images, 32 px views
    with torch.no_grad():
        want = model(tiles)["logits"].softmax(-1).mean(0).numpy()
    np.testing.assert_allclose(probs[0], want, rtol=1e-4, atol=1e-5)


def test_a_rerun_with_more_ssl_steps_redoes_what_was_derived_from_the_old_checkpoint(small_shards, tmp_path):
    """Evaluations, pseudo-labels and the retraining of an SSL stage that ran further are made again from the new
    checkpoint (the old ones are kept aside, `.stale-N`), so the report shows the model the stage ended with."""
    p = parse_config(
        None,
        {"out_dir": str(tmp_path / "out"), "base": str(base_yaml(small_shards, tmp_path)), "algorithms": ["fixmatch"],
         "ssl": {"train.steps": 4, "ckpt.every": 2, "eval.every": 0}, "retrain": {"train.steps": 2, "eval.every": 0}},
        cls=PipelineConfig,
    )  # fmt: skip
    run_pipeline(p)
    d = tmp_path / "out" / "fixmatch-iqa_safe-s0"
    first = json.loads((d / "eval" / "eval.json").read_text())["checkpoint_sha256"]
    run_pipeline(replace(p, ssl={**p.ssl, "train.steps": 6}))
    ssl_eval = json.loads((d / "eval_ssl" / "eval.json").read_text())
    assert ssl_eval["checkpoint"] == str(d / "ssl" / "step-6")
    assert ssl_eval["checkpoint_sha256"] == ckpt.recorded_sha256(d / "ssl" / "step-6")
    job = json.loads((d / "pseudo.csv.parts" / "job.json").read_text())
    assert job["checkpoint_sha256"] == ssl_eval["checkpoint_sha256"]  # pseudo-labels of the 6-step model
    assert json.loads((d / "eval" / "eval.json").read_text())["checkpoint_sha256"] != first  # retrained on them
    for old in ("eval_ssl", "pseudo.csv", "pseudo.csv.parts", "retrain", "eval"):
        assert (d / f"{old}.stale-1").exists(), old  # kept, not deleted


def test_the_classical_teacher_pseudo_labels_the_pool_for_a_student(small_shards, small_raw, tmp_path, capsys):
    """`pseudolabel --teacher reference`: features + ridge fit on the pack's labels label every pool image, in
    pseudolabel's columns with the pool's identity beside them; its scores rank the pool's hidden quality; a student
    trains on them. Wrong flags and a user's file as --out are one line and exit 2, before any feature is computed."""
    from scipy import stats

    from sslfw.data.pseudo import load_pseudo_labels, sidecar
    from sslfw.data.reader import ShardSet
    from sslfw.data.truth import truth_levels
    from sslfw.reference import set_features

    out = tmp_path / "teacher.csv"
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"my photo")
    for args, message in [
        (["--teacher", "reference"], "give --shards"),
        (["--teacher", "reference", "--shards", str(small_shards), "--checkpoint", str(tmp_path)], "no --checkpoint"),
        (["--shards", str(small_shards)], "--checkpoint: required"),
    ]:
        assert main(["pseudolabel", "--out", str(out), *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["pseudolabel", "--teacher", "reference", "--shards", str(small_shards), "--out", str(photo)]) == 2
    assert ".csv" in capsys.readouterr().err and photo.read_bytes() == b"my photo" and not out.exists()

    assert main(["pseudolabel", "--teacher", "reference", "--shards", str(small_shards), "--out", str(out)]) == 0
    pool = ShardSet(small_shards, "unlabelled")
    rows = read_csv(out)
    assert [int(r["idx"]) for r in rows] == list(range(len(pool)))
    assert [r["key"] for r in rows] == [pool.meta(i)["key"] for i in range(len(pool))]
    for r in rows:  # one-hot at the level the predicted MOS falls in
        probs = [float(r[f"p{k}"]) for k in range(5)]
        assert probs[int(r["label"])] == 1.0 and sum(probs) == 1.0 and float(r["confidence"]) == 1.0
    made = json.loads(sidecar(out).read_text())
    assert made["pool_fingerprint"] == pool.fingerprint and made["teacher"] == "features + ridge"
    labels, keep = load_pseudo_labels(out, pool, 0.0)  # what a student reads: accepted, every row kept
    assert keep.all() and labels.tolist() == [int(r["label"]) for r in rows]
    levels = truth_levels(
        small_raw / "synth_truth.csv", ShardSet(small_shards, "test"), load_index(small_shards)["label_scheme"]
    )
    rho = stats.spearmanr([float(r["score"]) for r in rows], [levels[r["key"]] for r in rows]).statistic
    assert rho > 0.3, rho  # the classical model sees quality in images it never had labels for
    one, two = (set_features(pool, workers=w) for w in (1, 2))  # the pool is 2 chunks: 2 processes, same features
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(one, two)) and len(one[0]) == len(pool)

    # In a pipeline: a ridge_teacher row per seed, its pseudo_acc the teacher's pool labels against the hidden truth.
    cfg = parse_config(None, {"out_dir": str(tmp_path / "grid"), "base": str(base_yaml(small_shards, tmp_path)),
                              "algorithms": ["supervised", "ridge_teacher"], "policies": ["iqa_safe", "randaugment"],
                              "ssl": {"train.steps": 4, "ckpt.every": 4, "eval.every": 0}, "retrain_stage": False,
                              "truth": str(small_raw / "synth_truth.csv")}, cls=PipelineConfig)  # fmt: skip
    run_pipeline(cfg)
    student = load_config(tmp_path / "grid" / "ridge_teacher-s0" / "ssl" / "config.yaml")
    assert student.algorithm.name == "supervised" and student.data.pseudo_share == 0.5
    assert Path(student.data.pseudo_labels).read_bytes() != b"" and sidecar(Path(student.data.pseudo_labels)).is_file()
    rows = {r["method"]: r for r in read_csv(tmp_path / "grid" / "report.csv")}
    assert list(rows)[2:] == ["supervised", "ridge_teacher"]  # one row per seed whatever the policies
    agree = np.mean([int(r["label"]) == levels[r["key"]] for r in read_csv(Path(student.data.pseudo_labels))])
    assert (
        rows["ridge_teacher"]["pseudo_acc"] == f"{agree:.3f}"
        and rows["ridge_teacher"]["Δsrcc vs supervised [95% CI]"] != "-"
    )
