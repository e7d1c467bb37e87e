"""Nothing lost, nothing executed: checkpoints are data, run folders have one owner, damaged inputs are named.

Each test reproduces one way a user's work could be lost or a bad input could crash, with real files and
processes (issue 12's numbered list: the number is in each test's docstring).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslfw import ckpt, fsio
from sslfw.cli import main
from sslfw.data.manifest import prepare
from sslfw.data.reader import decode_crop
from sslfw.data.shards import pack
from sslfw.errors import DataError
from sslfw.runconfig import load_config
from sslfw.train import train
from tests.helpers import child_env, make_raw, run_sslfw, sources, tiny_overrides, tree_hashes


def tiny(shards: Path, run: Path, **extra) -> list[str]:
    return tiny_overrides(shards, run, **{"eval.every": 0, **extra})


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class RunsCode:
    """A pickle that runs a shell command when loaded: what a hostile state.pt would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_checkpoint_is_refused_and_never_runs(tiny_run, tmp_path, capsys):
    """1: predict and train --resume auto on a state.pt whose pickle runs a command."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    step = ckpt.latest(run)
    marker = tmp_path / "pwned"
    with open(step / ckpt.STATE, "wb") as f:
        pickle.dump({"model": RunsCode(marker)}, f)
    (step / ckpt.MARKER).write_text(json.dumps({"step": 6}) + "\n")  # an old-style marker: no sizes to check
    img = tmp_path / "a.png"
    Image.new("RGB", (48, 48), (90, 120, 30)).save(img)
    assert main(["predict", "--checkpoint", str(run), str(img)]) == 2
    assert "refused" in capsys.readouterr().err
    cfg = load_config(run / "config.yaml", ["--train.steps=8", f"--run_dir={run}"])
    with pytest.raises(DataError, match="never runs code"):
        train(cfg)
    assert not marker.exists()


def test_resume_none_over_a_finished_run_is_refused_and_overwrite_moves_it_aside(small_shards, tmp_path):
    """2: a new start in a finished run's folder (--resume none, or another seed) leaves that run untouched."""
    run = tmp_path / "run"
    assert train(load_config(None, tiny(small_shards, run, **{"train.steps": 6, "ckpt.every": 3})))["step"] == 6
    before = tree_hashes(run)
    with pytest.raises(DataError, match="--resume none would train over them"):
        train(load_config(None, tiny(small_shards, run, **{"train.steps": 4, "ckpt.resume": "none"})))
    with pytest.raises(DataError, match=r"holds another run \(train.seed: 0 -> 7\)"):
        train(load_config(None, tiny(small_shards, run, **{"train.steps": 4, "train.seed": 7})))
    assert tree_hashes(run) == before  # not a byte changed: checkpoints, metrics, config.yaml
    again = train(
        load_config(None, tiny(small_shards, run, **{"train.steps": 4, "train.seed": 7, "ckpt.overwrite": True}))
    )
    assert again["step"] == 4
    (aside,) = tmp_path.glob("run.replaced-*")
    assert tree_hashes(aside) == before  # the old run moved, whole
    assert [s for s, _ in ckpt.valid_checkpoints(run)] == [4]
    (run / "run.json").unlink()  # a folder from before run.json existed: the checkpoint's own config still guards it
    with pytest.raises(DataError, match="was trained with another architecture"):
        train(load_config(None, tiny(small_shards, run, **{"train.steps": 6, "model.kwargs.depth": 2})))


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_a_second_trainer_on_the_same_folder_is_refused_while_the_first_finishes(small_shards, tmp_path, capsys):
    """3: two trainings on one folder (the second in this process: it is refused before it trains)."""
    run = tmp_path / "run"
    args = ["train", *tiny(small_shards, run, **{"train.steps": 600, "ckpt.every": 600})]
    first = subprocess.Popen(
        [sys.executable, "-m", "sslfw", *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and rows(run)):
        time.sleep(0.2)
    capsys.readouterr()
    assert main(args) == 2
    second = capsys.readouterr().err
    out, err = first.communicate(timeout=300)
    assert f"in use by sslfw train (run_dir {run}) (pid {first.pid}" in second, second[-2000:]
    assert first.returncode == 0, err[-2000:]
    assert [r["step"] for r in rows(run) if "train/loss" in r] == list(range(1, 601))  # one writer


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_stale_pseudo_label_chunks_are_refused_after_a_repack(tiny_run, small_manifest, tmp_path):
    """4: chunks made from one pack of the pool are not merged into a job on another pack."""
    shards, out = tmp_path / "shards", tmp_path / "pseudo.csv"
    pack(small_manifest, shards, samples_per_shard=15, workers=1, progress=False, seed=0)
    args = [
        "pseudolabel",
        "--checkpoint",
        str(tiny_run),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--chunk",
        "16",
        "--num-workers",
        "0",
        "--quiet",
    ]
    killed = run_sslfw(args, env={"SSLFW_FAULT_KILL": "0:0"})  # killed after its first chunk
    assert killed.returncode == -signal.SIGKILL and len(list(Path(f"{out}.parts").glob("chunk-*.npz"))) == 1
    pack(small_manifest, shards, samples_per_shard=15, workers=1, progress=False, seed=1)  # another order
    again = run_sslfw(args)
    assert again.returncode == 2 and "holds chunks of another job (pool_fingerprint differ)" in again.stderr
    assert not out.exists()


def _damage(path: Path, at: float, data: bytes | None = None, truncate: bool = False) -> None:
    raw = bytearray(path.read_bytes())
    if truncate:
        path.write_bytes(bytes(raw[: int(len(raw) * at)]))
        return
    pos = int(len(raw) * at) // 512 * 512
    raw[pos : pos + 512] = data or bytes(512)
    path.write_bytes(bytes(raw))


def test_damaged_shards_are_named_never_read_as_data(tiny_run, small_shards, tmp_path, capsys):
    """5: a zeroed block, a truncated shard and a zeroed sha256 in index.json."""
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    assert main(["shards", "verify", str(shards)]) == 0
    capsys.readouterr()
    _damage(shards / "val-000000.tar", 0.5)  # same size, wrong bytes
    eval_args = ["eval", "--checkpoint", str(tiny_run), "--split", "val", "--shards", str(shards), "--num-workers", "0"]
    assert main(eval_args) == 2
    err = capsys.readouterr().err.strip()
    assert "val-000000.tar: its sha256 does not match index.json" in err and len(err.splitlines()) == 1
    assert main(["shards", "verify", str(shards)]) == 2
    assert "val-000000.tar (sha256 differs)" in capsys.readouterr().err
    _damage(shards / "test-000000.tar", 0.5, truncate=True)
    assert main([*eval_args[:4], "test", *eval_args[5:]]) == 2
    err = capsys.readouterr().err
    assert "test-000000.tar: " in err and "bytes, index.json says" in err and "(truncated or replaced)" in err
    shutil.rmtree(shards)
    shutil.copytree(small_shards, shards)
    index = json.loads((shards / "index.json").read_text())
    index["sets"]["val"]["shards"][0]["sha256"] = "0" * 64
    (shards / "index.json").write_text(json.dumps(index))
    assert main(eval_args) == 2
    assert "val-000000.tar: its sha256 does not match" in capsys.readouterr().err


def test_sixteen_bit_and_float_images_become_the_right_eight_bit_pixels(tmp_path):
    """6: I;16 PNGs were read as all-255."""
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    got = decode_crop(path.read_bytes(), None, None)
    want = np.clip(np.floor(ramp / 257.0 + 0.5), 0, 255).astype(np.uint8)
    assert got.shape == (48, 64, 3) and np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    assert 0 < got.mean() < 255
    floats = Image.fromarray((ramp / 65535.0).astype(np.float32), "F")
    fpath = tmp_path / "float.tif"
    floats.save(fpath)
    assert np.abs(decode_crop(fpath.read_bytes(), None, None)[..., 1].astype(int) - want).max() <= 1


def test_prepare_replaces_a_manifest_whole_or_not_at_all(tmp_path, capsys):
    """7: a prepare that fails part-way leaves the previous manifest as it was."""
    raw = make_raw(tmp_path / "raw", koniq_count=40, kadis_count=12, extra_count=0)
    (raw / "kadis700k" / "kadis700k_ref_imgs.csv").unlink()  # the pool is then listed from the folder
    args = ["data", "prepare", "--koniq", str(raw / "koniq10k"), "--kadis", str(raw / "kadis700k"), "--out"]
    out = tmp_path / "manifest"
    assert main([*args, str(out)]) == 0
    before = tree_hashes(out)
    bad = raw / "kadis700k" / "ref_imgs" / os.fsdecode(b"caf\xe9.png")
    shutil.copy(next((raw / "kadis700k" / "ref_imgs").glob("*.png")), bad)
    assert main([*args, str(out), "--seed", "3"]) == 2
    assert "is not UTF-8. Rename it" in capsys.readouterr().err
    assert tree_hashes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["manifest", "raw"]
    bad.unlink()
    lines = (out / "labelled.csv").read_text().splitlines()
    (out / "labelled.csv").write_text("\n".join(lines[:-1]) + "\n")  # a manifest that no longer matches meta.json
    assert main(["shards", "pack", "--manifest", str(out), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "do not match meta.json" in capsys.readouterr().err


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_truncated_newest_checkpoint_and_a_kill_during_its_resave_still_resume_exactly(
    small_shards, tmp_path, capsys, one_thread
):
    """8 and 9: the newest checkpoint truncated; a kill between the renames of its re-save (the one step that needs
    a process of its own: the kill)."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    args = {"train.steps": 12, "ckpt.every": 4}
    for d in (whole, run):
        assert train(load_config(None, tiny(small_shards, d, **args)))["step"] == 12
    state = run / "step-12" / ckpt.STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    img = tmp_path / "a.png"
    Image.new("RGB", (48, 48), (90, 120, 30)).save(img)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), str(img)]) == 0
    assert f"skipping checkpoint {run / 'step-12'}: state.pt has" in capsys.readouterr().err
    killed = run_sslfw(["train", *tiny(small_shards, run, **args)], env={"SSLFW_FAULT_KILL_RESAVE": "0:12"})
    assert killed.returncode == -signal.SIGKILL and "steps 8->12" in killed.stdout
    assert not (run / "step-12").exists() and (run / "step-12.tmp").is_dir()  # killed between the renames
    resumed = train(load_config(None, tiny(small_shards, run, **{**args, "train.steps": 14})))
    assert resumed["step"] == 14 and "steps 12->14" in capsys.readouterr().out
    train(load_config(None, tiny(small_shards, whole, **{**args, "train.steps": 14})))
    a, b = (ckpt.load(ckpt.latest(d))[0]["model"] for d in (whole, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-12", "step-14", "step-8"]


def test_the_best_val_checkpoint_is_kept_beside_the_newest_and_named_run_best(small_shards, tmp_path):
    """ckpt.keep_best: pruning keeps the newest `ckpt.keep` checkpoints and the one whose step had the best val SRCC;
    RUN/best names it (eval, pseudolabel, predict, the pipeline); a run with no score says how to get one."""
    d = tmp_path / "pruned"
    for step, score in enumerate([0.1, 0.9, None, 0.2, 0.4], start=1):
        info = {"step": step} | ({} if score is None else {"val_score": {"key": "val/ema/srcc", "value": score}})
        ckpt.save(d, step, {"w": torch.full((2,), float(step))}, info, keep=2, keep_best=True)
    assert [s for s, _ in ckpt.valid_checkpoints(d)] == [2, 4, 5]
    assert ckpt.resolve(d / "best", "--checkpoint") == d / "step-2"
    ckpt.save(d, 6, {"w": torch.zeros(2)}, {"step": 6, "val_score": {"key": "val/ema/srcc", "value": 0.95}}, 2, True)
    assert [s for s, _ in ckpt.valid_checkpoints(d)] == [5, 6]  # the best is among the newest: step-2 goes
    ckpt.save(d, 7, {"w": torch.zeros(2)}, {"step": 7}, keep=2)  # keep_best off: the newest two only
    assert [s for s, _ in ckpt.valid_checkpoints(d)] == [6, 7]

    run = tmp_path / "run"  # the trainer records the val score of the checkpoints whose step it evaluated
    args = {"train.steps": 8, "eval.every": 2, "ckpt.every": 2, "ckpt.keep": 1}
    train(load_config(None, tiny(small_shards, run, **args)))
    scores = {r["step"]: r["val/ema/srcc"] for r in rows(run) if np.isfinite(r.get("val/ema/srcc", np.nan))}
    kept = {s: json.loads((p / ckpt.INFO).read_text()).get("val_score") for s, p in ckpt.valid_checkpoints(run)}
    best = max((v, s) for s, v in scores.items())[1] if scores else None  # every step evaluated is checkpointed
    assert set(kept) == {8} | ({best} if best else set())
    assert all(v == ({"key": "val/ema/srcc", "value": scores[s]} if s in scores else None) for s, v in kept.items())
    if best:
        assert ckpt.resolve(run / "best", "--checkpoint") == run / f"step-{best}"
        assert (run / "best").is_symlink() and os.readlink(run / "best") == f"step-{best}"  # ls finds it
    no_val = tmp_path / "no_val"
    train(load_config(None, tiny(small_shards, no_val, **{**args, "eval.every": 0, "eval.split": "test"})))
    with pytest.raises(DataError, match="has no checkpoint with a validation score"):
        ckpt.resolve(no_val / "best", "--checkpoint")


def test_disk_full_names_the_room_a_checkpoint_needs_and_keeps_the_old_ones(small_shards, tmp_path):
    """10: ENOSPC during a save."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        run = mnt / "run"
        with pytest.raises(DataError) as e:
            train(load_config(None, tiny(small_shards, run, **{"train.steps": 60, "ckpt.every": 2, "ckpt.keep": 50})))
        assert "no space left on the device while saving step" in str(e.value)
        assert "a checkpoint needs about" in str(e.value) and "The previous checkpoints are intact" in str(e.value)
        found = ckpt.valid_checkpoints(run)
        assert len(found) >= 1 and not list(run.glob("*.tmp"))
        assert all(ckpt.problem(p, deep=True) is None for _, p in found)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _no_traceback(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("sslfw: error: "), err
    return err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--optim.lr=-1", "optim.lr must be > 0, got -1.0"),
        ("--optim.lr=0", "optim.lr must be > 0"),
        ("--ckpt.every=0", "ckpt.every must be >= 1"),
        ("--train.log_every=0", "train.log_every must be >= 1"),
        ("--model.name=vit_tinny_patch16_224", "model.name: 'vit_tinny_patch16_224' is not a timm model; close:"),
        ("--data.load_crop=0", "must not exceed data.load_crop"),
        ("--ema.decay=2", "ema.decay must be >= 0 and < 1, got 2.0"),
        ("--optim.warmup_steps=-3", "optim.warmup_steps must be >= 0"),
        ("--log.wandb=online", "log.wandb: online needs a W&B API key"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2_before_anything_is_written(
    override, message, small_shards, tmp_path, capsys, monkeypatch
):
    """11 and 12: range checks on the config; nothing is written for a refused start."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    run = tmp_path / "run"
    assert main(["train", *tiny(small_shards, run), override]) == 2
    assert message in _no_traceback(capsys)
    assert not run.exists()


def test_bad_inputs_are_one_line_and_exit_2(tiny_run, small_shards, small_raw, tmp_path, capsys):
    """11 and 12: each input a user can get wrong names itself (no traceback); refusals write nothing."""
    run = tmp_path / "run"

    def refused(args: list[str], message: str) -> None:
        assert main(args) == 2, args
        assert message in _no_traceback(capsys), args

    prep = ["data", "prepare", "--koniq", str(small_raw / "koniq10k"), "--out", str(tmp_path / "m")]
    refused([*prep, "--bins", "1,2,3"], "--bins '1,2,3': label edges must be 4 increasing MOS values")
    koniq = tmp_path / "koniq"
    shutil.copytree(small_raw / "koniq10k", koniq)
    scores = koniq / "koniq10k_scores_and_distributions.csv"
    scores.write_bytes(scores.read_bytes().replace(b"\n", b"\n\xff", 1))
    refused(["data", "prepare", "--koniq", str(koniq), "--out", str(tmp_path / "m")], "line 2: byte 0xff is not UTF-8")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)
    refused(["predict", "--checkpoint", str(tiny_run), str(bomb)], "refused as a decompression bomb")
    refused(["predict", "--checkpoint", str(tiny_run), str(bomb), "--out", str(tmp_path)], "is a folder; give the csv")
    (tmp_path / "file").write_text("x")
    refused(["eval", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "file")], "is a file; give a folder")
    refused(["train", *tiny(small_shards, tmp_path / "file")], "run_dir: ")
    refused(
        ["train", *tiny(small_shards, run), "--model.kwargs=null", "--model.kwargs.channels=[8,16]"],
        "model.kwargs {'channels': [8, 16]}: timm's vit_tiny_patch16_224 refuses them",
    )
    refused(["train", *tiny(small_shards, run), "--resume", str(tmp_path / "nowhere")], "nowhere does not exist")
    refused(
        ["train", *tiny(small_shards, run, **{"model.kwargs.depth": 2}), "--resume", str(tiny_run)],
        "was trained with another architecture (model.kwargs:",
    )
    assert not run.exists()
    no_pool = tmp_path / "nopool"
    prepare(sources(small_raw / "koniq10k"), tmp_path / "m2")
    pack(tmp_path / "m2", no_pool, samples_per_shard=50, workers=1, progress=False)
    refused(
        ["pseudolabel", "--checkpoint", str(tiny_run), "--shards", str(no_pool), "--out", str(tmp_path / "p.csv")],
        "the unlabelled set is empty",
    )
    empty_val = tmp_path / "noval"
    prepare(sources(small_raw / "koniq10k"), tmp_path / "m3", split=(0.9, 0.0, 0.1))
    pack(tmp_path / "m3", empty_val, samples_per_shard=50, workers=1, progress=False)
    refused(["train", *tiny(empty_val, run)], "eval.split 'val' has no samples")
    assert not run.exists()


def test_resume_accepts_a_run_folder_and_says_when_there_is_nothing_to_do(tiny_run, tmp_path, capsys):
    """12: --resume RUN_DIR, and a resume at or past train.steps."""
    cfg = load_config(
        tiny_run / "config.yaml", ["--train.steps=6", f"--run_dir={tmp_path / 'next'}", f"--ckpt.resume={tiny_run}"]
    )
    assert train(cfg)["step"] == 6
    assert "is at step 6 >= train.steps=6: nothing to train" in capsys.readouterr().out
    cfg = load_config(
        tiny_run / "config.yaml", ["--train.steps=7", f"--run_dir={tmp_path / 'next'}", f"--ckpt.resume={tiny_run}"]
    )
    assert train(cfg)["step"] == 7  # continued from the run folder's newest checkpoint into a new folder


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_ctrl_c_saves_and_exits_130_and_a_second_one_aborts(small_shards, tmp_path):
    """13: Ctrl-C is a stop request like SIGTERM; twice is an abort. Sent, as a terminal does, to the whole process
    group (loader workers included)."""
    # Steps of about half a second, so the second press lands inside the step that the first one ends.
    slow = {"model.kwargs": "{patch_size: 8, embed_dim: 192, depth: 12, num_heads: 3}", "train.batch_size": 64}
    for presses in (1, 2):
        run = tmp_path / f"run{presses}"
        args = tiny(small_shards, run, **{"train.steps": 100000, "ckpt.every": 100000, "data.num_workers": 2, **slow})
        proc = subprocess.Popen(
            [sys.executable, "-m", "sslfw", "train", *args],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 3):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        seen = ""
        if presses == 2:  # the second press once the first was handled (two pending SIGINTs would merge into one)
            while "Ctrl-C: stopping" not in seen and (line := proc.stderr.readline()):
                seen += line
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        err = seen + err
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        if presses == 1:
            step = ckpt.valid_checkpoints(run)[-1][0]
            assert f"SIGINT on some rank: saved step-{step}, exiting with 130" in out
            assert history[-1] == {**history[-1], "event": "end", "step": step, "exit_code": 130}
        else:
            assert "sslfw: interrupted" in err


def test_an_image_that_no_longer_decodes_is_skipped_in_training_and_named_in_evaluation(
    tiny_run, small_shards, tmp_path, capsys
):
    """5: a damaged image inside an intact tar (its sha256 recorded as it now is)."""
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    index = json.loads((shards / "index.json").read_text())
    offsets = np.load(shards / index["sets"]["train"]["offsets"])
    shard, img_off = int(offsets[0][0]), int(offsets[0][1])
    info = index["sets"]["train"]["shards"][shard]
    tar = shards / info["name"]
    raw = bytearray(tar.read_bytes())
    raw[img_off : img_off + 16] = bytes(16)  # no image header any more
    tar.write_bytes(bytes(raw))
    info["sha256"] = fsio.sha256_file(tar)
    (shards / "index.json").write_text(json.dumps(index))
    run = tmp_path / "run"
    result = train(load_config(None, tiny(shards, run, **{"train.steps": 40, "train.batch_size": 16})))
    assert result["exit_code"] == 0 and result["step"] == 40
    damaged = [r["train/damaged_images"] for r in rows(run) if "train/damaged_images" in r]
    assert damaged and damaged[-1] >= 1  # the sample was drawn, skipped and counted
    assert (
        main(["eval", "--checkpoint", str(tiny_run), "--split", "train", "--shards", str(shards), "--num-workers", "0"])
        == 2
    )
    err = _no_traceback(capsys)
    assert f"{info['name']}: image " in err and "no longer decodes; re-pack" in err
