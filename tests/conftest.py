"""Shared fixtures: small embedded datasets built once per test session with the real commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sslfw.data.manifest import prepare
from sslfw.data.shards import pack
from sslfw.data.synth import SynthConfig, synthesize

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def make_raw(root: Path, **kw) -> Path:
    cfg = SynthConfig(out=root, **({"koniq_count": 120, "kadis_count": 80, "extra_count": 6, "width": 64,
                                    "height": 48, "workers": 1} | kw))
    synthesize(cfg)
    return root


def prepare_raw(raw: Path, out: Path, **kw) -> Path:
    prepare(raw / "koniq10k", raw / "kadis700k", out, extra_labels=raw / "kadis_extra_labels.csv", **kw)
    return out


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory) -> Path:
    """120 labelled + 80 pool images of 64x48 in the KonIQ/KADIS layouts."""
    return make_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def small_manifest(small_raw, tmp_path_factory) -> Path:
    return prepare_raw(small_raw, tmp_path_factory.mktemp("manifest"))


@pytest.fixture(scope="session")
def small_shards(small_manifest, tmp_path_factory) -> Path:
    """15 samples per shard: the train set spans 7 shards, val and test one each (fewer than ranks x workers)."""
    out = tmp_path_factory.mktemp("shards")
    pack(small_manifest, out, samples_per_shard=15, workers=1, progress=False)
    return out
