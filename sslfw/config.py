"""One config tree: dataclasses with defaults, a YAML file over them, then `--section.key=value` overrides.

Every key is checked against the tree (an unknown key or a value of the wrong type is an error naming the dotted
key), and the resolved tree is saved with every run as config.yaml.
"""

from __future__ import annotations

import dataclasses
import difflib
import netrc
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sslfw import fsio
from sslfw.errors import ConfigError


@dataclass
class DataConfig:
    shards: str = "shards/demo-seed0"  # a packed folder (index.json); `sslfw demo` builds this one
    load_crop: int = 80  # native-resolution square crop cut by the loader; views are cut from it on the device
    num_workers: int = 2  # DataLoader workers per stream and rank
    eval_batch_size: int = 64  # per rank
    pseudo_labels: str = ""  # a `sslfw pseudolabel` csv: retrain (supervised) on labelled + pseudo-labelled data
    pseudo_min_confidence: float = 0.0  # keep only pseudo-labels at least this confident
    # Share of each retraining batch drawn from pseudo-labels; 0: in proportion to their count (the paper's union,
    # which with a pool 10x the labels leaves the real labels 1 image in 11).
    pseudo_share: float = 0.0
    # Decode JPEG crops on the model's device (nvJPEG on a GPU) instead of in the loader workers; PNG, raw pixels
    # and the several-view eval modes stay in the workers (sslfw/data/jpeg.py).
    jpeg_on_device: bool = False


# Allowed values are types: the one coercion routine (`_coerce`) checks them, `--help` lists them, and the CLI's
# own flags (eval/predict/pseudolabel) and the pipeline read the same ones.
Weights = Literal["ema", "student"]  # which of a checkpoint's weights score images: the EMA teacher or the student
Crops = Literal[1, 5, 0]  # views per image: 1 centre, 5 centre + corners, 0 tiles covering the whole image
Split = Literal["train", "val", "test"]

IMAGENET_NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    img_size: int = 64  # model input side; views are native-resolution crops of this size
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (patch_size, depth, ...)
    # Weights to start from: a local state-dict file, or `package:NAME` for ImageNet weights a PyPI package ships
    # (sslfw/weights.py: package:efficientnet_lite0, with model.name tf_efficientnet_lite0). Nothing downloads.
    pretrained: str = ""
    # sha256 of the weights file, filled when the config loads (so config.yaml and every checkpoint record which
    # weights a run started from); a value given in a config must match the file.
    pretrained_sha256: str = ""
    drop_path: float = 0.0
    proj_dim: int = 64  # size of the projection head, when an algorithm asks for one
    # Input normalisation (RGB). Empty: taken from the weights' own timm config (config.json beside
    # model.pretrained), else timm's pretrained_cfg for model.name (0.5/0.5 for ViT augreg, ImageNet's for ResNets).
    # Resolved when the config loads, so every run, checkpoint, eval and predict uses the values it trained with.
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)


@dataclass
class AugConfig:
    # Strong views: IQA-safe ops, or USB's RandAugment op list (to reproduce the paper; most ops change quality)
    strong: Literal["iqa_safe", "randaugment"] = "iqa_safe"
    num_strong: int = 1  # strong views per unlabelled image (algorithms may ask for more)
    flip: bool = True  # horizontal flip in the weak view
    randaugment_ops: int = 3
    cutout: float = 0.5  # randaugment: largest cutout side as a fraction of the image side


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 5e-4  # for the global batch below, at the top layer
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    layer_decay: float = 1.0  # <1: lower layers get lr * decay^(depth - layer)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    clip_grad: float = 1.0  # max global grad norm; 0 disables
    # One fused kernel updates every parameter (GPU and CPU; BENCHMARKS.md has the timing); false keeps torch's
    # default path. The same update up to float rounding.
    fused: bool = True


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps; there are no loader epochs
    batch_size: int = 32  # GLOBAL labelled batch per optimizer step; each rank gets batch/(world*grad_accum)
    grad_accum: int = 1
    seed: int = 0
    # Mixed precision: auto = accelerate's (`accelerate launch --mixed_precision`, `accelerate config`), else bf16
    # on a GPU that has it, fp16 with a gradient scaler on one that does not (V100, T4), none on a CPU (where fp16
    # runs as fp32: accelerate has no CPU fp16 autocast). A value here wins over accelerate's.
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    log_every: int = 10
    # The weak unlabelled view only makes targets: forward it without autograd (same outputs, less backward work
    # and memory) when the model has no batch-statistics layer; BatchNorm models keep the one concatenated forward.
    weak_no_grad: bool = True
    compile: bool = False  # torch.compile the model (after the EMA copy is made); the first steps pay the compile


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999
    warmup: bool = True  # decay ramps up as (1+t)/(10+t) so early teachers are not stuck at the random init


@dataclass
class EvalConfig:
    every: int = 100  # steps; 0 disables periodic evaluation (the last step is always evaluated)
    split: Split = "val"
    weights: Literal["student", "ema", "both"] = "both"


@dataclass
class CkptConfig:
    every: int = 100
    keep: int = 3  # newest valid checkpoints kept
    # Also keep the checkpoint whose step had the best val SRCC (EMA weights when there are EMA weights): RUN/best.
    # Scored only where an evaluation on the val split falls on a checkpoint step; never on test (selecting on test
    # would make its numbers optimistic).
    keep_best: bool = True
    resume: str = "auto"  # auto (newest intact in run_dir, else start) | none | a step-N or run directory
    overwrite: bool = False  # a start over another run's folder moves that run aside (RUN_DIR.replaced-TIME)


@dataclass
class LogConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "sslfw"
    entity: str = ""  # W&B team or user; empty: your default
    name: str = ""  # run name in W&B; empty: the run folder's last two parts (e.g. fixmatch-iqa_safe-s0/ssl)
    group: str = ""  # W&B group; the pipeline sets its out_dir, so one study's runs sit together
    job_type: str = "train"  # the pipeline sets ssl / retrain / eval
    tags: list = field(default_factory=list)
    progress: bool = True
    # Pseudo-label trace (sslfw/trace.py): a row per unlabelled image and step, compressed (keys repeat); false
    # writes none, for runs whose pool batches times steps run into the hundreds of millions.
    pseudo_trace: bool = True


@dataclass
class AlgorithmConfig:
    name: str = "supervised"
    uratio: int = 1  # unlabelled batch = uratio x labelled batch
    lambda_u: float = 1.0  # weight of the unlabelled loss
    # How a strong view is pulled to its target: "ce" (cross-entropy over the 5 levels, as every paper) or
    # "ordinal" (binary cross-entropy on the 4 cumulative "better than level k" probabilities, so a target one
    # level away costs less than one three levels away; the levels are ordered, the classes of CIFAR are not).
    consistency: Literal["ce", "ordinal"] = "ce"
    # Labelled targets: "hard" (the level) or "votes" (each level's probability given the crowd's votes:
    # LabelScheme.vote_probs), so an image rated at a level edge teaches both neighbours.
    sup_targets: Literal["hard", "votes"] = "hard"
    # The algorithm's own hyper-parameters: checked against its Params dataclass when the config loads, and filled
    # with its defaults, so config.yaml, checkpoints and W&B record every value in force.
    params: dict = field(default_factory=dict)


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)


def _literal(key: str, value: Any, allowed: tuple) -> Any:
    if any(value == a and type(value) is type(a) for a in allowed):  # True is not 1
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint}")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is Literal:
        return _literal(key, value, typing.get_args(tp))
    if tp is type(None):
        if value is None:
            return None
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string: accept what float() accepts
            return float(value)
        except ValueError:
            pass
    elif tp is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    elif tp in (int, str, bool, dict, list) and type(value) is tp:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def _merge(node: Any, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(node))
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in hints:
            close = difflib.get_close_matches(k, hints, n=1)
            hint = f"did you mean {prefix + close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config key {key!r}; {hint}known here: {sorted(hints)}")
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {v!r}")
            _merge(getattr(node, k), v, f"{key}.")
        elif hints[k] is dict and v is None:
            setattr(node, k, {})  # `--model.kwargs=null` empties a free-form section
        elif hints[k] is dict and isinstance(v, dict):
            getattr(node, k).update(v)  # free-form sections merge key by key
        else:
            setattr(node, k, coerce(key, v, hints[k]))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


def parse_overrides(args: list[str]) -> list[dict]:
    """["--train.steps=10", "--model.kwargs.depth", "2"] -> one nested dict per override, applied in order (so
    `--model.kwargs=null --model.kwargs.depth=2` empties the mapping, then sets one key); values are YAML scalars.
    Dashes in keys read as underscores (`--report-only` is `--report_only`), and a key with no value is `true`."""
    out: list[dict] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:  # a bare flag: --log.progress, --report-only
            key, text = arg[2:], "true"
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"--{key}: {text[:40]!r} is not a YAML value ({str(e).splitlines()[0]})") from None
        out.append(nested({key: value}))
        i += 1
    return out


def nested(dotted: dict) -> dict:
    """{"train.steps": 3} -> {"train": {"steps": 3}}."""
    out: dict = {}
    for k, v in dotted.items():
        _set_dotted(out, k, v)
    return out


def parse_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, cls: type = None):
    """`cls` (default Config) filled from the YAML file, then the overrides; Config trees are checked (types,
    choices, ranges). What needs the layers above (algorithm params, weights files, timm names) is resolved by
    sslfw/runconfig.py's `load_config`, the one a run uses."""
    cfg = (cls or Config)()
    if path:
        data = fsio.read_yaml(Path(path), "this config file")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _merge(cfg, data, "")
    for tree in [overrides] if isinstance(overrides, dict) else parse_overrides(overrides or []):
        _merge(cfg, tree, "")
    if isinstance(cfg, Config):
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.model.img_size > cfg.data.load_crop:
        raise ConfigError(
            f"model.img_size ({cfg.model.img_size}) must not exceed data.load_crop "
            f"({cfg.data.load_crop}): views are crops of the loaded crop"
        )
    for key, interval in RANGES.items():
        section, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, section), name), interval)
    if cfg.run_dir == "" or Path(cfg.run_dir).is_file():
        raise ConfigError(f"run_dir: {cfg.run_dir!r} is {'empty' if not cfg.run_dir else 'a file'}; give a folder")
    if cfg.log.wandb == "online" and not _wandb_key():
        raise ConfigError(
            "log.wandb: online needs a W&B API key (run `wandb login` or set WANDB_API_KEY); "
            "or use --log.wandb=offline and `wandb sync` later"
        )


# Every number a run reads, with its valid interval: "[" / "]" closed, "(" / ")" open, "inf" unbounded.
RANGES = {
    "train.steps": "[1, inf)", "train.batch_size": "[1, inf)", "train.grad_accum": "[1, inf)",
    "train.max_nonfinite": "[1, inf)", "train.log_every": "[1, inf)",
    "algorithm.uratio": "[1, inf)", "algorithm.lambda_u": "[0, inf)",
    "optim.lr": "(0, inf)", "optim.weight_decay": "[0, inf)", "optim.layer_decay": "(0, 1]",
    "optim.warmup_steps": "[0, inf)", "optim.min_lr_ratio": "[0, 1]", "optim.clip_grad": "[0, inf)",
    "ema.decay": "[0, 1)", "eval.every": "[0, inf)", "ckpt.every": "[1, inf)", "ckpt.keep": "[1, inf)",
    "data.load_crop": "[1, inf)", "data.num_workers": "[0, inf)", "data.eval_batch_size": "[1, inf)",
    "data.pseudo_min_confidence": "[0, 1]", "data.pseudo_share": "[0, 1)", "model.img_size": "[1, inf)",
    "model.drop_path": "[0, 1)", "model.proj_dim": "[1, inf)", "aug.num_strong": "[1, inf)",
    "aug.randaugment_ops": "[0, inf)", "aug.cutout": "[0, 1]",
}  # fmt: skip


def _check_range(key: str, value: float, interval: str) -> None:
    lo_text, hi_text = (s.strip() for s in interval[1:-1].split(","))
    lo, hi = float(lo_text), float(hi_text)
    lo_ok = lo < value if interval[0] == "(" else lo <= value
    hi_ok = value < hi if interval[-1] == ")" else value <= hi
    if not (lo_ok and hi_ok):
        bound = f"{'>' if interval[0] == '(' else '>='} {lo_text}"
        bound += "" if hi == float("inf") else f" and {'<' if interval[-1] == ')' else '<='} {hi_text}"
        raise ConfigError(f"{key} must be {bound}, got {value}")


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, the dataclass that declares it) of every leaf of a config dataclass: what `--help`
    lists."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe_keys(hint, f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        rows.append((key, name, text, cls.__name__))
    return rows


def save_config(cfg: Config, path: str | Path) -> None:
    fsio.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
