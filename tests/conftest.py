"""Shared fixtures: small embedded datasets built once per test session with the real commands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sslfw.data.shards import pack
from tests.helpers import make_raw, prepare_raw, tiny_overrides

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


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


@pytest.fixture(scope="session")
def tiny_run(small_shards, tmp_path_factory) -> Path:
    """A supervised run of 6 steps on the small shards: a real checkpoint for inference tests."""
    from sslfw.runconfig import load_config
    from sslfw.train import train

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train(load_config(None, tiny_overrides(small_shards, run, **{"train.steps": 6, "ckpt.every": 6, "eval.every": 0})))
    return run


@pytest.fixture
def one_thread():
    """In-process training with the one OpenMP thread the child processes get, so both compute the same floats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tests that build the embedded dataset or train on it take seconds each: they belong to the full suite, and the fast
# tier (`pytest -m 'not slow'`, under a minute on 2 cores) keeps the unit tests that need neither.
DATASET_FIXTURES = {"small_raw", "small_manifest", "small_shards", "tiny_run"}
# Modules whose tests share a module-scoped fixture (one Slurm cluster; one torchrun launch for every algorithm) keep
# to one xdist worker (`pytest -n 2 --dist loadgroup`); every other test goes to whichever worker is free.
SHARED_MODULE_FIXTURES = {"test_slurm", "test_algorithms"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if DATASET_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`, done here: xdist 3.8 groups tests by appending the group to `item._nodeid`, which pytest 9
    no longer reads (a node's id is `_id`), so loadgroup silently became load. Then both workers ran the module
    fixtures, and one worker stopped the Slurm cluster while the other's jobs still ran on it. Here a scope is the
    module for SHARED_MODULE_FIXTURES and the test itself otherwise."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if Path(path).stem in SHARED_MODULE_FIXTURES else nodeid

    return SharedModules(config, log)
