"""The second adversarial round (issue 24): silent wrong data, a user's files lost, bad arguments as tracebacks,
files a lab cannot share. Each test reproduces cases that failed on the code before the fix, with real files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from PIL import Image

from sslfw import ckpt
from sslfw.cli import main
from sslfw.data.manifest import prepare
from sslfw.data.shards import pack
from sslfw.errors import DataError
from tests.helpers import ROOT, child_env, sources


def _refused(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err


def test_bad_counts_and_sizes_are_refused_before_any_work(tiny_run, tmp_path, capsys):
    pl = ["pseudolabel", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "p.csv")]
    for flag, value, message in [("--chunk", "0", "--chunk: 0 must be >= 1"), ("--chunk", "-5", "-5 must be >= 1"),
                                 ("--batch-size", "0", "--batch-size: 0 must be >= 1"),
                                 ("--num-workers", "-1", "--num-workers: -1 must be >= 0")]:  # fmt: skip
        _refused(capsys, [*pl, flag, value], message)
    _refused(capsys, ["data", "synth", "--out", str(tmp_path / "d"), "--koniq-count", "0"], "--koniq-count: 0 must")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "d").exists()


def test_image_names_that_leave_the_dataset_folder_and_infinite_votes_are_refused(small_raw, tmp_path):
    for bad, message in [("../secret.jpg", "leaves the dataset folder"), ("/etc/hosts", "leaves the dataset folder")]:
        koniq = tmp_path / f"k{len(message)}{bad.count('/')}"
        shutil.copytree(small_raw / "koniq10k", koniq)
        scores = koniq / "koniq10k_scores_and_distributions.csv"
        lines = scores.read_text().splitlines()
        first = lines[1].split(",")
        (koniq / "secret.jpg").write_bytes((koniq / "1024x768" / first[0]).read_bytes())
        lines[1] = ",".join([bad, *first[1:]])
        scores.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=f"line 2: image_name={bad!r} leaves the dataset folder"):
            prepare(sources(koniq), tmp_path / "m")
    koniq = tmp_path / "inf"
    shutil.copytree(small_raw / "koniq10k", koniq)
    scores = koniq / "koniq10k_scores_and_distributions.csv"
    rows = list(csv.DictReader(scores.open()))
    rows[0]["c1"] = "inf"
    with scores.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(), w.writerows(rows)
    with pytest.raises(DataError, match="line 2: c1=inf is outside"):
        prepare(sources(koniq), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_pack_keeps_a_users_tars_and_clears_what_a_killed_pack_left(small_manifest, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "my-backup.tar").write_bytes(b"the user's own archive")
    with pytest.raises(DataError, match="holds files this command did not write"):
        pack(small_manifest, out, samples_per_shard=50, workers=1, progress=False)
    assert (out / "my-backup.tar").read_bytes() == b"the user's own archive"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".fresh.{dead.pid}.abc.staged"  # what a pack killed by SIGKILL leaves beside its output
    left.mkdir()
    (left / "train-000000.tar").write_bytes(b"x" * 1000)
    live = tmp_path / f".fresh.{os.getpid()}.def.staged"  # a pack still running in this process: left alone
    live.mkdir()
    old = os.umask(0o022)
    try:
        pack(small_manifest, tmp_path / "fresh", samples_per_shard=50, workers=1, progress=False)
    finally:
        os.umask(old)
    assert not left.exists() and live.exists()
    for path in [tmp_path / "fresh", *(tmp_path / "fresh").iterdir()]:  # a lab-mate can read a shared pack
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_predict_never_writes_over_a_photo_and_checks_its_output_before_scoring(tiny_run, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (48, 40), (120, 60, 30)).save(photos / name)
    before = (photos / "a.jpg").read_bytes()
    # `sslfw predict --checkpoint run --out photos/*.jpg`: the shell hands --out the first photo
    _refused(capsys, ["predict", "--checkpoint", str(tiny_run), "--out", str(photos / "a.jpg"), str(photos / "b.jpg")],
             "give a path ending in .csv")  # fmt: skip
    assert (photos / "a.jpg").read_bytes() == before
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: a path under a file cannot be made either way
            target = tmp_path / "afile" / "x.csv"
            (tmp_path / "afile").write_text("")
        else:
            target = locked / "x.csv"
        _refused(capsys, ["predict", "--checkpoint", str(tiny_run), "--out", str(target), str(photos)], "--out")
    finally:
        locked.chmod(0o700)


def test_a_pseudo_label_csv_made_before_a_repack_is_refused(tiny_run, small_manifest, tmp_path):
    from sslfw.commands.pseudolabel import pseudolabel
    from sslfw.data.pseudo import load_pseudo_labels
    from sslfw.data.reader import ShardSet

    shards, out = tmp_path / "shards", tmp_path / "pseudo.csv"
    pack(small_manifest, shards, samples_per_shard=15, workers=1, progress=False, seed=0)
    assert pseudolabel(tiny_run, out, shards=shards, num_workers=0, progress=False)["exit_code"] == 0
    labels, _ = load_pseudo_labels(out, ShardSet(shards, "unlabelled"), 0.0)  # the same pack: accepted
    assert (labels >= 0).all()
    rows, broken = out.read_text().splitlines(), tmp_path / "broken.csv"
    broken.write_text("\n".join([*rows, rows[1]]) + "\n")  # one more row than the pool: its idx repeats
    with pytest.raises(DataError, match=f"line {len(rows) + 1}: idx {rows[1].split(',')[1]} appears twice"):
        load_pseudo_labels(broken, ShardSet(shards, "unlabelled"), 0.0)
    made = tmp_path / "pseudo.csv.json"  # what the csv was made from, written beside it
    assert json.loads(made.read_text())["checkpoint_sha256"] == ckpt.recorded_sha256(ckpt.latest(tiny_run))
    out.write_text(out.read_text().replace(rows[1], rows[1][:-1] + "9", 1))  # an edit after pseudolabel wrote it
    with pytest.raises(DataError, match="changed since sslfw pseudolabel wrote it"):
        load_pseudo_labels(out, ShardSet(shards, "unlabelled"), 0.0)
    out.write_text("\n".join(rows) + "\n")
    pack(small_manifest, shards, samples_per_shard=15, workers=1, progress=False, seed=1)  # same pool, another order
    with pytest.raises(DataError, match=r"pseudo.csv: made for the pool of .* not .*shards"):
        load_pseudo_labels(out, ShardSet(shards, "unlabelled"), 0.0)
    made.unlink()  # without the record, the rows' keys still tell
    with pytest.raises(DataError, match="the csv was made for another pack of the pool"):
        load_pseudo_labels(out, ShardSet(shards, "unlabelled"), 0.0)
    first = rows[1].split(",")
    broken.write_text("\n".join([rows[0], ",".join([first[0], "x1", *first[2:]]), *rows[2:]]) + "\n")
    with pytest.raises(DataError, match="line 2: idx and label must be whole numbers"):
        load_pseudo_labels(broken, ShardSet(shards, "unlabelled"), 0.0)
    broken.write_text("key,idx\n" + "\n".join(",".join(r.split(",")[:2]) for r in rows[1:]) + "\n")
    with pytest.raises(DataError, match="line 2: no label"):
        load_pseudo_labels(broken, ShardSet(shards, "unlabelled"), 0.0)


def test_a_checkpoint_named_directly_is_checked_against_its_sha256(tiny_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    step = ckpt.latest(copy)
    state = step / ckpt.STATE
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    state.write_bytes(bytes(raw))
    for args in (["eval", "--checkpoint", str(step), "--split", "val"],
                 ["predict", "--checkpoint", str(step), str(ROOT / "docs")]):  # fmt: skip
        _refused(capsys, args, "does not match its sha256 (damaged)")


def test_slurm_on_a_cpu_node_with_zero_gpus_runs_one_process():
    env = child_env(
        SSLFW_VENV=sys.prefix,
        SLURM_GPUS_ON_NODE="0",
        SLURM_JOB_NODELIST="n1",
        SLURM_JOB_ID="7",
        SLURM_CPUS_PER_TASK="4",
    )
    env.pop("SSLFW_PROCS_PER_NODE", None)
    script = (
        f'scontrol() {{ echo n1; }}; source "{ROOT}/slurm/common.sh"; echo "$SSLFW_PROCS_PER_NODE $OMP_NUM_THREADS"'
    )
    out = subprocess.run(["bash", "-c", script], env={**env, "OMP_NUM_THREADS": ""}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["1", "4"]
    bad = subprocess.run(
        ["bash", "-c", script], env={**env, "SSLFW_PROCS_PER_NODE": "two"}, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "SSLFW_PROCS_PER_NODE=two" in bad.stderr


def test_half_written_json_and_a_run_without_ema_are_one_line(small_shards, tmp_path, capsys):
    from sslfw.runconfig import load_config
    from sslfw.train import train
    from tests.helpers import tiny_overrides

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    index = shards / "index.json"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])  # a crash mid-write in an older version
    _refused(capsys, ["shards", "verify", str(shards)], "index.json: not readable JSON")
    _refused(capsys, ["train", *tiny_overrides(shards, tmp_path / "r1")], "index.json: not readable JSON")
    run = tmp_path / "noema"
    extra = {"train.steps": 2, "ckpt.every": 2, "eval.every": 0, "ema.enabled": "false"}
    assert train(load_config(None, tiny_overrides(small_shards, run, **extra)))["exit_code"] == 0
    _refused(capsys, ["eval", "--checkpoint", str(run), "--split", "val"], "has no EMA teacher")
    assert main(["eval", "--checkpoint", str(run), "--split", "val", "--weights", "student", "--num-workers", "0"]) == 0


def test_a_run_resumed_on_another_pack_and_an_eval_with_other_bins_are_refused(small_raw, tmp_path, capsys):
    from sslfw.runconfig import load_config
    from sslfw.train import train
    from tests.helpers import tiny_overrides

    shards, run = tmp_path / "shards", tmp_path / "run"
    prepare(sources(small_raw / "koniq10k", small_raw / "kadis700k"), tmp_path / "m")
    pack(tmp_path / "m", shards, samples_per_shard=40, workers=1, progress=False)
    over = {"train.steps": 2, "ckpt.every": 2, "eval.every": 0}
    assert train(load_config(None, tiny_overrides(shards, run, **over)))["step"] == 2
    assert ckpt.recorded_data(run / "step-2")["label_edges"] == [1.79, 2.55, 3.46, 3.94]
    # Another split packed into the same folder: the run would silently train on other images.
    prepare(sources(small_raw / "koniq10k", small_raw / "kadis700k"), tmp_path / "m2", seed=1)
    pack(tmp_path / "m2", shards, samples_per_shard=40, workers=1, progress=False)
    with pytest.raises(DataError, match=r"is not the data .*step-2 was trained on \(fingerprint: .*split_sha256"):
        train(load_config(None, tiny_overrides(shards, run, **(over | {"train.steps": 4}))))
    # Other --bins: the levels mean other MOS ranges, so the metrics would compare different things.
    prepare(sources(small_raw / "koniq10k"), tmp_path / "m3", bins="quantile:10,20,40,20,10")
    pack(tmp_path / "m3", tmp_path / "binned", samples_per_shard=40, workers=1, progress=False)
    args = ["eval", "--checkpoint", str(run), "--shards", str(tmp_path / "binned"), "--split", "val"]
    _refused(capsys, args, "was trained with [1.79, 2.55, 3.46, 3.94]; the metrics would compare different levels")


def test_raising_train_steps_says_how_the_schedule_changes(small_shards, tmp_path, capsys):
    from sslfw.runconfig import load_config
    from sslfw.train import train
    from tests.helpers import tiny_overrides

    over = {"train.steps": 4, "ckpt.every": 2, "eval.every": 0, "optim.warmup_steps": 1}
    train(load_config(None, tiny_overrides(small_shards, tmp_path / "run", **over)))
    capsys.readouterr()
    train(load_config(None, tiny_overrides(small_shards, tmp_path / "run", **(over | {"train.steps": 8}))))
    out = capsys.readouterr().out
    assert "train.steps 4 -> 8: the cosine schedule now ends at step 8, so the lr at step 4 is" in out


def test_a_command_printed_for_the_user_works_when_pasted_whatever_the_path_holds(tmp_path):
    import re
    import shlex

    from sslfw.data.manifest import load
    from sslfw.data.shards import load_index

    folder = tmp_path / "my shards; echo 'x'"
    folder.mkdir()
    for reader, verb in ((load_index, "sslfw shards pack --out"), (load, "sslfw data prepare --out")):
        with pytest.raises(DataError) as e:
            reader(folder)
        command = re.search(rf"`({verb} .*?)`", str(e.value)).group(1)
        assert shlex.split(command)[-1] == str(folder), command  # one argument, as the shell will read it


def test_a_pipeline_row_given_as_checkpoint_points_at_its_stage_folders(tiny_run, tmp_path, capsys):
    row = tmp_path / "fixmatch-iqa_safe-s0"
    shutil.copytree(tiny_run, row / "ssl")
    _refused(capsys, ["eval", "--checkpoint", str(row), "--split", "val"], f"its run folders are ['{row / 'ssl'}']")


@pytest.mark.slow  # a 169-megapixel image
def test_predict_on_a_huge_image_stays_within_a_bound_of_its_decoded_size(tiny_run, tmp_path):
    """A 13000x13000 PNG (a few hundred KB, under Pillow's bomb limit): predict keeps the image and its tiles as
    uint8 and makes floats one batch of views at a time, so its peak memory stays near 2x the decoded pixels (507 MB)
    plus the interpreter; it was 5.2 GB when every view became float before batching."""
    big = tmp_path / "big.png"
    Image.new("RGB", (13000, 13000), (120, 130, 140)).save(big, compress_level=1)
    probe = (
        "import resource, sys; from sslfw.cli import main; rc = main(sys.argv[1:]); "
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    args = ["predict", "--checkpoint", str(tiny_run), str(big), "--out", str(tmp_path / "p.csv")]
    args += ["--batch-size", "2048"]  # views per forward pass: the floats of one batch, 25 MB
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=child_env(),
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_gb = int(proc.stdout.split("peak")[-1].split()[0]) / 2**20  # ru_maxrss is in KiB on Linux
    assert peak_gb < 2.5, peak_gb


def test_a_config_that_is_not_one_is_refused_in_bounded_time(tmp_path, capsys):
    """A dataset file passed as --config and a YAML alias bomb (ten lines, 9^9 values once expanded) are one line
    and exit 2, quickly, in bounded memory: the bomb is refused after 100,000 visits, never walked to the end."""
    big = tmp_path / "big.yaml"
    big.write_text("train: {steps: 10}\n# " + "x" * (1 << 20) + "\n")
    _refused(capsys, ["config", "show", "--config", str(big)], "is not a config")
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(lines) + "\ntrain: {steps: 10}\n")
    _refused(capsys, ["config", "show", "--config", str(bomb)], "expands to more than 100,000 values")
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 200_000 + "]" * 200_000 + "\n")
    _refused(capsys, ["config", "show", "--config", str(deep)], "nested too deeply to be a config")
    (tmp_path / "ok.yaml").write_text("shared: &s {steps: 12}\n")  # aliases within the bound still load
    from sslfw.fsio import read_yaml

    assert read_yaml(tmp_path / "ok.yaml", "a test") == {"shared": {"steps": 12}}


def test_a_csv_that_is_not_a_label_csv_is_one_line_naming_it(tmp_path):
    """Over the size bound (a sparse file: refused before a byte is read), a field over csv's limit:
    each one DataError naming the file (and the line where there is one), never a csv traceback."""
    from sslfw.data.importers import MAX_CSV_BYTES, read_csv

    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as f:
        f.write(b"image_name,MOS\n")
        f.truncate(MAX_CSV_BYTES + 1)
    with pytest.raises(DataError, match=r"huge.csv: 268,435,457 bytes is over the 256 MiB"):
        read_csv(huge, ["image_name", "MOS"])
    wide = tmp_path / "wide.csv"
    wide.write_text('image_name,MOS\n"' + "y" * (1 << 18) + '",3\n')
    with pytest.raises(DataError, match=r"wide.csv, line 2: field larger than field limit"):
        read_csv(wide, ["image_name", "MOS"])


def test_a_retraining_run_resumes_only_on_the_pseudo_labels_it_started_with(tiny_run, small_shards, tmp_path, capsys):
    """The run records the pseudo-label csv's sha256 with its checkpoints: resuming after the csv was regenerated
    or edited (its record deleted) is refused naming what changed; the same csv resumes."""
    from sslfw.commands.pseudolabel import pseudolabel
    from tests.helpers import tiny_overrides

    out = tmp_path / "pseudo.csv"
    assert pseudolabel(tiny_run, out, shards=small_shards, num_workers=0, progress=False)["exit_code"] == 0
    args = ["train", *tiny_overrides(small_shards, tmp_path / "re", **{"data.pseudo_labels": out, "eval.every": 0})]
    assert main([*args, "--train.steps=2", "--ckpt.every=2"]) == 0
    rows = out.read_text().splitlines()
    out.write_text("\n".join([rows[0], rows[1][: rows[1].rindex(",", 0, rows[1].rindex(","))] + ",1.0,0.5", *rows[2:]]))
    (tmp_path / "pseudo.csv.json").unlink()  # the user takes responsibility for the edit: rows are still checked
    _refused(capsys, [*args, "--train.steps=4", "--ckpt.every=2"], "pseudo_labels_sha256")
    out.write_text("\n".join(rows) + "\n")  # the csv it started with, byte for byte
    assert main([*args, "--train.steps=4", "--ckpt.every=2"]) == 0
