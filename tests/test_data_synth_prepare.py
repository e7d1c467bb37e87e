"""synth -> prepare: determinism, label shares, and the errors bad input gets."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from sslfw.cli import main
from sslfw.data.importers import read_koniq
from sslfw.data.labels import PAPER_SHARES, LabelScheme
from sslfw.data.manifest import load, prepare
from sslfw.errors import DataError
from tests.helpers import make_raw, prepare_raw, sources, tree_hashes


@pytest.mark.slow  # a real CLI process or a full-size synth: seconds
def test_synth_is_byte_identical_for_the_same_flags_whatever_the_worker_count(tmp_path):
    a = make_raw(tmp_path / "a", koniq_count=70, kadis_count=70, workers=1)
    b = make_raw(tmp_path / "b", koniq_count=70, kadis_count=70, workers=2)
    c = make_raw(tmp_path / "c", koniq_count=70, kadis_count=70, workers=1, seed=1)
    ha, hb = tree_hashes(a), tree_hashes(b)
    assert len(ha) == 70 + 70 + 5  # images + scores, sets, kadis csv, extra labels, hidden truth
    assert ha == hb
    assert tree_hashes(c) != ha


def test_synth_writes_the_koniq_and_kadis_layouts(small_raw):
    with open(small_raw / "koniq10k" / "koniq10k_scores_and_distributions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
    for r in rows[1:]:
        votes = np.array([float(x) for x in r[1:6]])
        assert votes.sum() == float(r[6])
        assert float(r[7]) == pytest.approx((votes * np.arange(1, 6)).sum() / votes.sum(), abs=1e-5)  # MOS = mean vote
        assert 1 <= float(r[7]) <= 5 and 0 <= float(r[9]) <= 100
        assert (small_raw / "koniq10k" / "1024x768" / r[0]).is_file()
    assert len(list((small_raw / "kadis700k" / "ref_imgs").glob("*.png"))) == 80


def test_quality_follows_distortion_severity_and_capture_defects(small_raw):
    """The hidden score is what the image shows: severe distortions score far below flawless shots, and among
    undistorted images a defocused, noisy or over-exposed shot scores below a flawless one."""
    with open(small_raw / "synth_truth.csv") as f:
        rows = list(csv.DictReader(f))
    undistorted = [r for r in rows if r["dist_type"] == "0"]
    flawless = [
        r for r in undistorted if float(r["defocus"]) == 0 and float(r["noise"]) == 0 and r["exposure"] == "1.000"
    ]
    flawed = [r for r in undistorted if r not in flawless]
    severe = [float(r["true_mos"]) for r in rows if r["dist_level"] in ("4", "5")]
    assert flawless and flawed
    best = np.mean([float(r["true_mos"]) for r in flawless])
    assert best > np.mean(severe) + 1.0
    assert best > np.mean([float(r["true_mos"]) for r in flawed]) + 0.2


@pytest.mark.slow  # a real CLI process or a full-size synth: seconds
def test_default_size_gives_the_paper_label_shares(tmp_path):
    """Default flags, default bins: class shares within 2.5 points of the paper's 2/13/49/33/2 %."""
    raw = tmp_path / "raw"
    assert main(["data", "synth", "--out", str(raw)]) == 0
    meta = prepare(sources(raw / "koniq10k", raw / "kadis700k"), tmp_path / "m")
    shares = np.array(meta["class_shares"])
    assert np.abs(shares - np.array(PAPER_SHARES)).max() < 0.025, shares
    assert meta["counts"]["train"] + meta["counts"]["val"] + meta["counts"]["test"] == 1200


def test_prepare_splits_stratified_and_records_a_hash(small_manifest, small_raw, tmp_path):
    labelled, pool, meta = load(small_manifest)
    assert len(labelled) == 126 and len(pool) == 80 - 6  # extras move from the pool to the labelled rows
    assert meta["counts"]["unlabelled"] == 74 and meta["counts"]["extra"] == 6
    assert sum(meta["counts"][s] for s in ("train", "val", "test")) == 126
    for split in ("train", "val", "test"):
        counts = np.array(meta["class_counts"][split])
        total = (
            np.array(meta["class_counts"]["train"])
            + np.array(meta["class_counts"]["val"])
            + np.array(meta["class_counts"]["test"])
        )
        frac = {"train": 0.8, "val": 0.1, "test": 0.1}[split]
        assert np.all(np.abs(counts - total * frac) <= 1)  # per-class rounding only
    again = prepare_raw(small_raw, tmp_path / "again")
    assert load(again)[2]["split"]["sha256"] == meta["split"]["sha256"]
    other = prepare_raw(small_raw, tmp_path / "other", seed=1)
    assert load(other)[2]["split"]["sha256"] != meta["split"]["sha256"]


def test_official_split_and_quantile_bins(small_raw, tmp_path):
    sets = small_raw / "koniq10k" / "koniq10k_distributions_sets.csv"
    meta = prepare(sources(small_raw / "koniq10k"), tmp_path / "m", koniq_sets=sets, bins="quantile:10,20,40,20,10")
    with open(sets) as f:
        want = {r["image_name"]: r["set"] for r in csv.DictReader(f)}
    labelled, _, _ = load(tmp_path / "m")
    names = {"training": "train", "validation": "val", "test": "test"}
    assert all(r.split == names[want[Path(r.path).name]] for r in labelled)
    shares = np.array(meta["class_shares"])
    assert np.abs(shares - [0.1, 0.2, 0.4, 0.2, 0.1]).max() < 0.05
    assert meta["split"]["method"] == "official"


def test_label_scheme_edges():
    s = LabelScheme()
    assert [s.label(m) for m in (1.0, 1.79, 2.0, 3.46, 3.93, 3.94, 5.0)] == [0, 1, 1, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="increasing"):
        LabelScheme((2.0, 1.0, 3.0, 4.0))


def _koniq_copy(small_raw: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "koniq10k"
    shutil.copytree(small_raw / "koniq10k", dst)
    return dst


def _edit_row(csv_path: Path, row: int, new: str | None) -> None:
    lines = csv_path.read_text().splitlines()
    if new is None:
        lines.insert(row, lines[row])
    else:
        lines[row] = new
    csv_path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ln: ln.rsplit(",", 1)[0], "line 4: 9 fields where the header has 10"),
        (lambda ln: ",".join(ln.split(",")[:7] + ["7.5"] + ln.split(",")[8:]), "line 4: MOS=7.5 is outside 1.0..5.0"),
        (lambda ln: ",".join(ln.split(",")[:7] + ["good"] + ln.split(",")[8:]), "line 4: MOS='good' is not a number"),
        (lambda ln: ",".join(ln.split(",")[:9] + ["140"]), "line 4: MOS_zscore=140.0 is outside 0.0..100.0"),
        (lambda ln: "missing.jpg," + ln.split(",", 1)[1], "line 4: image"),
        (None, "line 5: duplicate image_name"),
    ],
)
def test_bad_rows_name_the_file_and_line(small_raw, tmp_path, edit, message):
    koniq = _koniq_copy(small_raw, tmp_path)
    scores = koniq / "koniq10k_scores_and_distributions.csv"
    lines = scores.read_text().splitlines()
    _edit_row(scores, 3, None if edit is None else edit(lines[3]))
    with pytest.raises(DataError) as e:
        read_koniq(koniq)
    assert str(scores) in str(e.value) and message in str(e.value)


def test_bad_header_and_cli_exit_code(small_raw, tmp_path, capsys):
    koniq = _koniq_copy(small_raw, tmp_path)
    scores = koniq / "koniq10k_scores_and_distributions.csv"
    _edit_row(scores, 0, scores.read_text().splitlines()[0].replace("MOS,", "score,"))
    rc = main(["data", "prepare", "--koniq", str(koniq), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{scores}, line 1: header lacks column(s) ['MOS']" in err
    assert not (tmp_path / "m" / "meta.json").exists()


def test_bad_extra_label(small_raw, tmp_path):
    extra = tmp_path / "extra.csv"
    name = sorted((small_raw / "kadis700k" / "ref_imgs").glob("*.png"))[0].name
    extra.write_text(f"image_name,label\n{name},7\n")
    with pytest.raises(DataError, match=r"extra.csv, line 2: label=7.0 is outside 0..4"):
        prepare(sources(small_raw / "koniq10k", small_raw / "kadis700k", extra), tmp_path / "m")


def test_labelled_fraction_moves_the_rest_of_train_into_the_pool(small_raw, tmp_path):
    full = prepare_raw(small_raw, tmp_path / "full")
    part = prepare_raw(small_raw, tmp_path / "part", labelled_fraction=0.25)
    lf, pf, mf_full = load(full)
    lp, pp, mf_part = load(part)
    train_full = [r for r in lf if r.split == "train"]
    train_part = [r for r in lp if r.split == "train"]
    assert {r.key for r in train_part} < {r.key for r in train_full}
    for c in range(5):  # stratified: every level keeps about a quarter of its train images
        n = sum(r.label == c for r in train_full)
        assert sum(r.label == c for r in train_part) == round(n * 0.25)
    moved = {r.key for r in train_full} - {r.key for r in train_part}
    assert {k for k, _ in pp} == {k for k, _ in pf} | moved  # the rest joined the pool, without labels
    assert [r.key for r in lp if r.split != "train"] == [r.key for r in lf if r.split != "train"]  # val/test as is
    assert mf_part["split"]["labelled_fraction"] == 0.25 and mf_part["counts"]["moved_to_pool"] == len(moved)
    assert mf_part["split"]["sha256"] != mf_full["split"]["sha256"]


def test_the_generic_importer_packs_and_trains_on_a_csv_with_its_own_columns_and_scale(small_raw, tmp_path, capsys):
    """SPAQ-like ratings: columns `file` and `quality` on 0..100, images in another folder than the csv."""
    from sslfw.data.shards import pack
    from sslfw.runconfig import load_config
    from sslfw.train import train
    from tests.helpers import tiny_overrides

    with open(small_raw / "koniq10k" / "koniq10k_scores_and_distributions.csv") as f:
        koniq = list(csv.DictReader(f))
    photos = tmp_path / "photos"
    shutil.copytree(small_raw / "koniq10k" / "1024x768", photos)
    ratings = tmp_path / "my_ratings.csv"
    with open(ratings, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["quality", "file", "rater_count"])
        w.writerows([[f"{(float(r['MOS']) - 1) * 25:.3f}", r["image_name"], 9] for r in koniq])
    m = tmp_path / "m"
    args = ["data", "prepare", "--ratings", str(ratings), "--images", str(photos), "--image-column", "file",
            "--score-column", "quality", "--kadis", str(small_raw / "kadis700k"), "--split", "0.6,0.2,0.2"]  # fmt: skip
    assert main([*args, "--out", str(m)]) == 0
    rows, pool, meta = load(m)
    scores = [(float(r["MOS"]) - 1) * 25 for r in koniq]
    assert meta["sources"]["ratings"]["score_range"] == pytest.approx([min(scores), max(scores)], abs=1e-3)
    mos = {Path(r.path).name: r.mos for r in rows}
    lo, hi = min(scores), max(scores)
    for r in koniq[:20]:  # 0..100 mapped onto 1..5 through the observed ends
        want = 1 + 4 * ((float(r["MOS"]) - 1) * 25 - lo) / (hi - lo)
        assert mos[r["image_name"]] == pytest.approx(want, abs=1e-3)
    assert {r.source for r in rows} == {"ratings"} and len(pool) == 80
    given = tmp_path / "m_given"
    assert main([*args, "--score-range", "0,100", "--out", str(given)]) == 0
    assert load(given)[2]["sources"]["ratings"]["score_range"] == [0.0, 100.0]
    assert {Path(r.path).name: r.mos for r in load(given)[0]} == pytest.approx(
        {r["image_name"]: float(r["MOS"]) for r in koniq}, abs=1e-3
    )  # the full scale given: exactly the MOS the scores came from
    capsys.readouterr()
    assert main([*args[:-2], "--image-column", "name", "--out", str(tmp_path / "bad")]) == 2
    assert "my_ratings.csv, line 1: header lacks column(s) ['name']" in capsys.readouterr().err
    shards = tmp_path / "shards"
    pack(m, shards, samples_per_shard=20, workers=1, progress=False)
    res = train(load_config(None, tiny_overrides(shards, tmp_path / "run", **{"train.steps": 3, "eval.every": 3})))
    assert res["exit_code"] == 0 and res["step"] == 3 and 0 <= res["val"]["val/ema/mae"] <= 4
