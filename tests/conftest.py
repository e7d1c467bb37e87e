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


ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    """A ViT small enough for CPU tests: 32x32 views, 8x8 patches, one block of width 32."""
    base = {"run_dir": run_dir, "data.shards": shards, "data.load_crop": 40, "data.num_workers": 0,
            "data.eval_batch_size": 16, "model.img_size": 32,
            "model.kwargs": "{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
            "train.steps": 20, "train.batch_size": 8, "train.log_every": 1, "optim.warmup_steps": 5,
            "eval.every": 10, "ckpt.every": 10, "log.wandb": "disabled", "log.progress": "false"}
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def run_sslfw(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300, launcher: str = "torchrun"):
    """`sslfw ...` in fresh processes: plain python, torchrun or accelerate launch with 2 gloo CPU processes."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "sslfw", *args]
    elif launcher == "accelerate":
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sslfw", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "sslfw", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(small_shards, tmp_path_factory) -> Path:
    """A supervised run of 6 steps on the small shards: a real checkpoint for inference tests."""
    from sslfw.config import load_config
    from sslfw.train import train

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    train(load_config(None, tiny_overrides(small_shards, run, **{"train.steps": 6, "ckpt.every": 6,
                                                                 "eval.every": 0})))
    return run
