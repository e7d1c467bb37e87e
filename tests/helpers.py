"""Helpers shared by the tests: small embedded datasets made with the real commands, tiny configs, and `sslfw`
run in fresh processes (plain, torchrun or accelerate launch)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from sslfw.data.importers import Sources, import_sources
from sslfw.data.manifest import prepare
from sslfw.data.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[1]


def make_raw(root: Path, **kw) -> Path:
    cfg = SynthConfig(
        out=root,
        **({"koniq_count": 120, "kadis_count": 80, "extra_count": 6, "width": 64, "height": 48, "workers": 1} | kw),
    )
    synthesize(cfg)
    return root


def sources(koniq: Path, kadis: Path | None = None, extra: Path | None = None) -> Sources:
    """The embedded layouts through their importers, as `sslfw data prepare --koniq --kadis --extra-labels` does."""
    return import_sources(
        koniq={"root": koniq},
        extra={"csv_path": extra, "kadis_root": kadis} if extra else None,
        kadis={"root": kadis} if kadis else None,
    )


def prepare_raw(raw: Path, out: Path, **kw) -> Path:
    prepare(sources(raw / "koniq10k", raw / "kadis700k", raw / "kadis_extra_labels.csv"), out, **kw)
    return out


def tiny_overrides(shards: Path, run_dir: Path, **extra) -> list[str]:
    """A ViT small enough for CPU tests: 32x32 views, 8x8 patches, one block of width 32."""
    base = {
        "run_dir": run_dir,
        "data.shards": shards,
        "data.load_crop": 40,
        "data.num_workers": 0,
        "data.eval_batch_size": 16,
        "model.img_size": 32,
        "model.kwargs": "{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
        "train.steps": 20,
        "train.batch_size": 8,
        "train.log_every": 1,
        "optim.warmup_steps": 5,
        "eval.every": 10,
        "ckpt.every": 10,
        "log.wandb": "disabled",
        "log.progress": "false",
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, by relative path: compares two outputs byte for byte."""
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def child_env(**extra: str) -> dict:
    """The environment of a test's child process: this checkout importable, one OpenMP thread per process."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def torchrun(nproc: int, *target: str) -> list[str]:
    """torchrun with `nproc` local gloo processes on `target` (a script path, or "-m", "sslfw", ...)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]


def free_port() -> int:
    """A TCP port nothing listens on now: accelerate's launcher otherwise takes 29500, which two tests running at
    once (pytest -n 2) would share."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sslfw(
    args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300, launcher: str = "torchrun",
    restarts: int = 0, cwd: Path | None = None,
):  # fmt: skip
    """`sslfw ...` in fresh processes: plain python, torchrun or accelerate launch with 2 gloo CPU processes;
    `restarts`: how often the launcher restarts the job's processes when one dies (--max-restarts)."""
    env = child_env(**(env or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "sslfw", *args]
    elif launcher == "accelerate":
        env["ACCELERATE_USE_CPU"] = "true"
        launch = "--multi_gpu --num_machines 1 --mixed_precision no --dynamo_backend no".split()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, f"--num_processes={nproc}"]
        cmd += [f"--main_process_port={free_port()}"] + ([f"--max_restarts={restarts}"] if restarts else [])
        cmd += ["-m", "sslfw", *args]
    else:
        cmd = torchrun(nproc, *([f"--max-restarts={restarts}"] if restarts else []), "-m", "sslfw", *args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def base_yaml(small_shards: Path, tmp_path: Path, **extra) -> Path:
    """The tiny test config as a YAML file: a pipeline's `base`."""
    tree: dict = {}
    for arg in tiny_overrides(small_shards, tmp_path / "unused", **extra):
        key, value = arg[2:].split("=", 1)
        node = tree
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tree))
    return base
