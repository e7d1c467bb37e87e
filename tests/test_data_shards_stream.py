"""pack -> streams: reproducible shards, corrupt images skipped, DDP-safe training and exactly-once evaluation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from sslfw.data.jpeg import images_on, join_deferred
from sslfw.data.labels import LabelScheme
from sslfw.data.reader import ShardSet, decode_crop, read_image
from sslfw.data.shards import load_index, pack
from sslfw.data.stream import EvalStream, TrainStream, make_loader
from tests.helpers import ROOT, child_env, make_raw, prepare_raw, torchrun, tree_hashes


def test_pack_is_byte_reproducible_and_skips_a_corrupt_jpeg(tmp_path):
    raw = make_raw(tmp_path / "raw", koniq_count=40, kadis_count=20, extra_count=2)
    victim = sorted((raw / "koniq10k" / "1024x768").glob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 3])  # truncated JPEG
    manifest = prepare_raw(raw, tmp_path / "m")
    a = pack(manifest, tmp_path / "a", samples_per_shard=7, workers=1, progress=False)
    pack(manifest, tmp_path / "b", samples_per_shard=7, workers=2, progress=False)
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    assert [s["key"] for s in a["skipped"]] == [f"koniq_{victim.stem}"]
    assert "OSError" in a["skipped"][0]["error"] or "truncated" in a["skipped"][0]["error"]
    labelled = sum(a["sets"][s]["count"] for s in ("train", "val", "test"))
    assert labelled == 40 + 2 - 1 and a["sets"]["unlabelled"]["count"] == 20 - 2
    for s in a["sets"].values():  # index counts agree with the shards themselves
        assert sum(sh["count"] for sh in s["shards"]) == s["count"]


def test_shards_are_plain_webdataset_with_original_bytes(small_shards, small_manifest):
    index = load_index(small_shards)
    urls = [str(small_shards / s["name"]) for s in index["sets"]["val"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == index["sets"]["val"]["count"]
    meta = json.loads(samples[0]["json"])
    assert set(meta) >= {"key", "idx", "gidx", "label", "mos", "votes", "set"}
    original = next(
        Path(r.split(",")[1])
        for r in (small_manifest / "labelled.csv").read_text().splitlines()[1:]
        if r.startswith(meta["key"] + ",")
    )
    assert samples[0]["jpg"] == original.read_bytes()  # stored as is, never re-encoded
    assert sorted(json.loads(s["json"])["idx"] for s in samples) == list(range(len(samples)))


def test_train_stream_resumes_exactly_whatever_the_worker_count(small_shards):
    train = ShardSet(small_shards, "train")
    full = make_loader(TrainStream(train, 8, (32, 32), seed=3, rank=0), num_workers=2)
    first = [b for _, b in zip(range(12), full)]
    resumed = make_loader(TrainStream(train, 8, (32, 32), seed=3, rank=0, start_step=7), num_workers=1)
    again = [b for _, b in zip(range(5), resumed)]
    for a, b in zip(first[7:], again):
        assert int(a["step"]) == int(b["step"])
        assert torch.equal(a["idx"], b["idx"]) and torch.equal(a["image"], b["image"])
    assert first[0]["image"].dtype == torch.uint8 and first[0]["image"].shape == (8, 3, 32, 32)
    other_rank = TrainStream(train, 8, (32, 32), seed=3, rank=1).make_batch(0)
    other_stream = TrainStream(train, 8, (32, 32), seed=3, rank=0, stream=1).make_batch(0)
    assert not torch.equal(other_rank["idx"], first[0]["idx"])
    assert not torch.equal(other_stream["idx"], first[0]["idx"])


def test_vote_targets_are_level_probabilities_of_the_crowd_mean(small_shards):
    """algorithm.sup_targets=votes: one-hot far from an edge, split across an edge the MOS sits on, rows sum to 1,
    and images without votes (hand labels, pseudo-labels) keep their level."""
    scheme = LabelScheme()  # edges 1.79, 2.55, 3.46, 3.94
    far = scheme.vote_probs([0, 0, 100, 0, 0], 2)  # MOS 3.0 with sd 0: level 2 only
    np.testing.assert_allclose(far, np.eye(5)[2], atol=1e-9)
    on_edge = scheme.vote_probs([0, 0, 54, 46, 0], 2)  # MOS 3.46 = the 2|3 edge
    assert on_edge[2] == pytest.approx(0.5, abs=0.02) and on_edge[3] == pytest.approx(0.5, abs=0.02)
    np.testing.assert_allclose(scheme.vote_probs(None, 4), np.eye(5)[4])
    batch = TrainStream(ShardSet(small_shards, "train"), 8, (32, 32), seed=3, rank=0).make_batch(0)
    assert batch["target"].shape == (8, 5)
    torch.testing.assert_close(batch["target"].sum(1), torch.ones(8))
    # The target's most likely level is the stored label unless the MOS is within a few standard errors of an edge.
    assert (batch["target"].argmax(1) == batch["label"]).float().mean() >= 0.75


def test_train_stream_covers_the_set_evenly(small_shards):
    """Resampled blocks: over many steps every sample is drawn, none far more often than the others."""
    train = ShardSet(small_shards, "train")
    stream = TrainStream(train, 8, (32, 32), seed=0, rank=0)
    ids = np.concatenate([stream.batch_indices(s) for s in range(200)])
    counts = np.bincount(ids, minlength=len(train))
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()


def test_crop_is_native_resolution(small_shards):
    val = ShardSet(small_shards, "val")
    data, _ = val.read(0)
    batch = next(iter(make_loader(EvalStream(val, 4, None, 0, 1), 0)))
    full = batch["image"][0]
    assert full.shape == (3, 48, 64)  # no resize
    crop = next(iter(make_loader(EvalStream(val, 4, (32, 32), 0, 1), 0)))["image"][0]
    assert torch.equal(crop, full[:, 8:40, 16:48])  # centre crop = a window of the original pixels


@pytest.mark.slow  # real processes (DDP, signals, kills)
def test_ddp_two_ranks_two_workers_seven_shards(small_shards, tmp_path):
    cmd = torchrun(2, str(ROOT / "tests" / "dist" / "stream_ddp.py"), str(small_shards), str(tmp_path), "10")
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["train_shards"] == 7
    assert r0["train_steps"] == r1["train_steps"] == 10
    assert r0["train_idx"] != r1["train_idx"]  # ranks draw different samples
    for name in ("train", "val"):
        everything = r0[name]["all"]
        assert sorted(everything) == list(range(r0[name]["size"]))  # every sample exactly once
        assert set(r0[name]["idx"]).isdisjoint(r1[name]["idx"])
    assert r0["val"]["shards"] == 1  # fewer shards than 2 ranks x 2 workers, still exactly once


@pytest.mark.parametrize("pixels", ["raw", "zstd"])
def test_decoded_pixel_shards_give_the_same_batches(pixels, small_manifest, small_shards, tmp_path):
    raw = tmp_path / pixels
    index = pack(small_manifest, raw, samples_per_shard=15, workers=1, progress=False, pixels=pixels)
    assert index["pixels"] == pixels
    first = next(iter(wds.WebDataset(str(raw / index["sets"]["unlabelled"]["shards"][0]["name"]), shardshuffle=False)))
    assert {"raw": "npy", "zstd": "zpx"}[pixels] in first  # plain webdataset still reads them
    for name in ("train", "unlabelled"):
        a, b = (
            TrainStream(ShardSet(small_shards, name), 8, (40, 40), 3, 0),
            TrainStream(ShardSet(raw, name), 8, (40, 40), 3, 0),
        )
        for step in range(3):
            assert torch.equal(a.make_batch(step)["image"], b.make_batch(step)["image"])
    pool = ShardSet(raw, "unlabelled")
    whole, _ = pool.read(0)
    reads: list[int] = []
    pool._file(0)
    pool._files[0] = _Counting(pool._files[0], reads)  # count the bytes a windowed read takes from the shard
    img, _ = read_image(pool, 0, (16, 16), np.random.default_rng(0))  # a third of the 48 rows
    assert np.array_equal(img, decode_crop(whole, (16, 16), np.random.default_rng(0)))  # the same draw and pixels
    y = int(np.random.default_rng(0).integers(48 - 16 + 1))
    if pixels == "raw":
        assert sum(reads) < len(whole) / 2  # the header and the crop's rows, not the image
    elif y // 32 == (y + 15) // 32:  # zstd: the crop lies in one block of 32 rows, so only that block is read
        assert sum(reads) < len(whole)
    for crop, crops in (((40, 40), 5), ((200, 200), 1)):  # corners, and a crop larger than the image (padding)
        a = next(iter(EvalStream(ShardSet(small_shards, "test"), 6, crop, 0, 1, crops=crops)))
        b = next(iter(EvalStream(ShardSet(raw, "test"), 6, crop, 0, 1, crops=crops)))
        assert torch.equal(a["image"], b["image"])


def test_loader_workers_write_batches_straight_into_shared_memory(small_shards):
    """A worker's batch is born in shared memory (sending it then copies nothing) and holds the same pixels as
    the in-process batch, for training crops and for eval tiles (crops end to end)."""
    train, test = ShardSet(small_shards, "train"), ShardSet(small_shards, "test")
    for stream, crops in (
        (TrainStream(train, 8, (32, 32), seed=3, rank=0), None),
        (EvalStream(test, 4, (40, 40), 0, 1, crops=0), 0),
    ):
        in_process = next(iter(stream))
        assert not in_process["image"].is_shared()  # no shared segment where nothing is sent
        from_worker = next(iter(make_loader(_SharedProbe(stream), num_workers=1)))
        assert bool(from_worker["born_shared"])
        assert torch.equal(from_worker["image"], in_process["image"])
        assert from_worker["image"].shape == in_process["image"].shape
        if crops == 0:
            assert int(in_process["tiles"].sum()) == len(in_process["image"]) > len(in_process["tiles"])


def test_jpeg_crops_left_for_the_device_decode_to_the_workers_pixels(small_shards):
    """Deferred JPEG crops, decoded by `images_on` (here on the CPU, the same libjpeg-turbo), equal the workers'
    crops: the same random corners, through a worker too; PNG, padding and corner views stay in the workers."""
    cpu = torch.device("cpu")
    for name in ("train", "unlabelled"):  # KonIQ-like JPEGs, KADIS-like PNGs
        plain = TrainStream(ShardSet(small_shards, name), 8, (32, 32), 3, 0)
        deferred = TrainStream(ShardSet(small_shards, name, jpeg_on_device=True), 8, (32, 32), 3, 0, start_step=2)
        batch = next(iter(make_loader(deferred, num_workers=1)))
        assert ("jpeg" in batch) == (name == "train")
        assert torch.equal(images_on(batch, cpu), plain.make_batch(2)["image"])
    test, test_deferred = ShardSet(small_shards, "test"), ShardSet(small_shards, "test", jpeg_on_device=True)
    for crop, crops in (((40, 40), 1), ((40, 40), 5), ((200, 200), 1)):
        a = next(iter(EvalStream(test, 6, crop, 0, 1, crops=crops)))
        b = next(iter(EvalStream(test_deferred, 6, crop, 0, 1, crops=crops)))
        assert ("jpeg" in b) == (crops == 1 and crop == (40, 40))
        assert torch.equal(images_on(b, cpu), a["image"])
    # A pseudo-labelled batch appended to a labelled one (retraining): slots and byte offsets follow.
    train = TrainStream(ShardSet(small_shards, "train", jpeg_on_device=True), 4, (32, 32), 3, 0)
    first, second = train.make_batch(0), train.make_batch(1)
    joined = {"image": torch.cat([first["image"], second["image"]])} | join_deferred(first, second)
    expected = torch.cat([images_on(first, cpu), images_on(second, cpu)])
    assert torch.equal(images_on(joined, cpu), expected) and expected.float().std() > 0


class _SharedProbe(torch.utils.data.IterableDataset):
    """Reports whether each batch was already in shared memory inside the worker that made it."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        for batch in self.inner:
            yield batch | {"born_shared": torch.tensor(batch["image"].is_shared())}


class _Counting:
    """A file whose reads add their sizes to `log`."""

    def __init__(self, f, log: list[int]):
        self.f, self.log = f, log

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.log.append(len(data))
        return data

    def seek(self, *args) -> int:
        return self.f.seek(*args)
