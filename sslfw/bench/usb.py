"""`sslfw bench usb`: sslfw's FixMatch step beside USB's own (semilearn, the released package), timed in turn in
one process on the same model and initial weights, the same augmented views, device and optimizer settings.

USB runs from its own virtual environment (`.venv-usb`, made on first use) that sees this environment's torch and
timm through a .pth file: semilearn's torch >= 1.12 pin is met, so it is installed with --no-deps plus the few
libraries its FixMatch import chain reads. semilearn imports audio and text libraries at start (torchaudio,
transformers, aim) that an image step never calls; torchaudio has no build for this torch, so those three are
import placeholders that fail loudly if anything does call them.

USB's step is its loop body: `train_step` (one concatenated forward with autograd, losses, `.item()` logs), then
its hooks (`ParamUpdateHook`: backward, clipping, optimizer; `EMAHook`: shadow update and two state-dict loads;
on a CPU without `TimerHook`, whose CUDA events need a GPU).
Its optimizer is its own `get_optimizer` (AdamW, per-tensor path); no lr schedule on either side. On a GPU USB uses
its fp16 autocast with a GradScaler (`amp`), sslfw bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.machinery
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

USB_VERSION = "0.3.2"
NEEDS = ["scikit-learn", "tensorboard", "ruamel.yaml", "progress"]  # what `semilearn.algorithms` imports at start
PLACEHOLDERS = ("torchaudio", "transformers", "aim")


def usb_python(root: Path) -> Path:
    """The interpreter of .venv-usb, made (once) beside the repository's own .venv; offline from the wheels in
    $SSLFW_USB_WHEELS when set (`pip download semilearn==0.3.2 --no-deps -d DIR; pip download -d DIR` + NEEDS)."""
    venv = root / ".venv-usb"
    python = venv / "bin" / "python"
    if not (venv / "ready").is_file():
        import site

        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        theirs = (
            subprocess.run(
                [str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True, capture_output=True
            )
            .stdout.decode()
            .strip()
        )
        Path(theirs, "sslfw_env.pth").write_text(site.getsitepackages()[0] + "\n")  # our torch, timm, numpy
        pip = [str(python), "-m", "pip", "install", "-q"]
        if os.environ.get("SSLFW_USB_WHEELS"):  # a machine without the package index: wheels fetched beforehand
            pip += ["--no-index", "--find-links", os.environ["SSLFW_USB_WHEELS"]]
        subprocess.run([*pip, "--no-deps", f"semilearn=={USB_VERSION}"], check=True)
        subprocess.run([*pip, *NEEDS], check=True)
        (venv / "ready").write_text(USB_VERSION + "\n")
    return python


def run_usb_bench(a: argparse.Namespace, root: Path) -> dict:
    """Run the comparison inside .venv-usb (a child process); its table prints there and lands in --out."""
    cmd = [str(usb_python(root)), "-m", "sslfw.bench.usb", "--config", str(a.config), "--reps", str(a.reps)]
    cmd += ["--steps", str(a.steps), *(["--shards", str(a.shards)] if a.shards else [])]
    cmd += [*(["--out", str(a.out)] if a.out else []), *a.overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise SystemExit(code)
    return {"tables": ["usb"], "out": str(a.out) if a.out else None}


class _Placeholder(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*_a, **_k):
            raise RuntimeError(f"{self.__name__}.{name} is a placeholder in sslfw's USB benchmark")

        return type(name, (), {"__init__": refuse})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in PLACEHOLDERS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def usb_fixmatch(model, cfg, device):
    """USB's FixMatch on `model`, built without its dataset, loader and model factories (overridden here)."""
    sys.meta_path.insert(0, _PlaceholderFinder())
    from semilearn.algorithms.fixmatch import FixMatch
    from semilearn.core.utils import get_optimizer

    class Bench(FixMatch):
        def set_dataset(self):
            return {}

        def set_data_loader(self):
            return {}

        def set_model(self):
            return model

        def set_ema_model(self):
            return copy.deepcopy(model)

        def set_optimizer(self):
            o = cfg.optim
            return get_optimizer(model, "AdamW", o.lr, 0.9, o.weight_decay, o.layer_decay), None

    amp = device.type == "cuda" and cfg.train.precision != "no"
    args = argparse.Namespace(
        num_classes=5, ema_m=cfg.ema.decay, epoch=1, num_train_iter=10**9, num_eval_iter=10**9, num_log_iter=10**9,
        ulb_loss_ratio=1.0, use_cat=True, amp=amp, clip_grad=cfg.optim.clip_grad, save_name="bench",
        save_dir=tempfile.mkdtemp(prefix="usb-bench-"), resume=False, algorithm="fixmatch",
        gpu=device.index if device.type == "cuda" else None, rank=0, distributed=False, world_size=1, T=0.5,
        p_cutoff=cfg.algorithm.params.get("p_cutoff", 0.95), hard_label=True, use_wandb=False, use_aim=False,
        num_checkpoint_iter=10**9,
    )  # fmt: skip
    algo = Bench(args, net_builder=None)
    if device.type != "cuda":  # USB's TimerHook records CUDA events: instrumentation that cannot run on a CPU
        algo.hooks_dict.pop("TimerHook")
    algo.model.train()
    algo.call_hook("before_run")
    return algo


def main(argv: list[str] | None = None) -> None:
    from sslfw.bench import Table, median_seconds, save
    from sslfw.bench.compute import Harness, _setup
    from sslfw.runconfig import load_config

    p = argparse.ArgumentParser(prog="sslfw bench usb")
    for flag, kind, default in (("--config", Path, None), ("--shards", Path, None), ("--out", Path, None),
                                ("--reps", int, 5), ("--steps", int, 5)):  # fmt: skip
        p.add_argument(flag, type=kind, default=default)
    a, overrides = p.parse_known_args(argv)
    cfg = load_config(a.config, [*overrides, "--algorithm.name=fixmatch"])
    shards = str(a.shards or cfg.data.shards)
    acc, raw = _setup(cfg, shards)
    ours = Harness(cfg, "fixmatch", acc, raw)
    usb = usb_fixmatch(copy.deepcopy(ours.run.raw_model), cfg, acc.device)  # same initial weights
    b = ours.batch

    def usb_steps() -> None:
        for _ in range(a.steps):
            usb.call_hook("before_train_step")
            usb.out_dict, usb.log_dict = usb.train_step(b.x_lb, b.y_lb, b.x_ulb_w[0], b.x_ulb_s[0])
            usb.call_hook("after_train_step")
            usb.it += 1

    t = median_seconds({"sslfw": lambda: ours.steps(a.steps), "usb": usb_steps}, a.reps)
    table = Table(
        f"usb: fixmatch step, sslfw vs USB (semilearn {USB_VERSION}), {cfg.model.name} at {cfg.model.img_size}px, "
        f"labelled {len(b.x_lb)} + unlabelled {len(b.x_ulb_w[0])}, 1 process on {acc.device.type}",
        ["implementation", "step ms", "steps/s", "sslfw / USB throughput", "target"],
    )
    for name in ("sslfw", "usb"):
        target = ">= 2 on a GPU, >= 1 on CPU" if name == "sslfw" else ""
        table.add(name, 1e3 * t[name] / a.steps, a.steps / t[name], t["usb"] / t[name], target)
    print(table.markdown(), flush=True)
    if a.out:
        save(a.out, [table], {"config": str(a.config), "overrides": overrides, "shards": shards})


if __name__ == "__main__":
    main()
