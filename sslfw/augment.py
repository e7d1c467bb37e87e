"""Weak and strong views, drawn per sample, computed batched on the training device (same code on CPU and GPU).

torchvision v2 and kornia's RandAugment draw one parameter set (or one op set) per batch (docs/NOTES.md, Augmentation);
here every sample gets its own crop window, flips and ops. Randomness comes only from the `torch.Generator` passed
in, so a step's views are a function of that generator's seed.

Policies for the strong view:
- `iqa_safe`: geometry only (another native-resolution crop window, flips, 90-degree turns on square crops). Pixel
  values are moved, never changed, so the view has the quality of the original (docs/NOTES.md, Augmentation).
- `randaugment`: USB's op list with USB's magnitude ranges, plus cutout, for reproducing the paper. Most of these ops
  change perceived quality; that is the point of offering both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sslfw.config import AugConfig


def _u(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A size x size window per sample at its own random position, by indexing (exact pixels, any dtype)."""
    n, _, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} views from {h}x{w} images; raise data.load_crop")
    ys = torch.randint(0, h - size + 1, (n,), generator=gen, device=x.device)
    xs = torch.randint(0, w - size + 1, (n,), generator=gen, device=x.device)
    ar = torch.arange(size, device=x.device)
    rows = (ys[:, None] + ar)[:, None, :, None]  # n,1,size,1
    cols = (xs[:, None] + ar)[:, None, None, :]  # n,1,1,size
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[batch, chan, rows, cols]


def random_flips(x: torch.Tensor, gen: torch.Generator, vertical: bool = False, turns: bool = False) -> torch.Tensor:
    """Per-sample horizontal flips, optionally vertical flips and transposes (all 8 symmetries of a square)."""

    def pick(y: torch.Tensor, alt: torch.Tensor) -> torch.Tensor:
        return torch.where((_u(len(y), gen, y.device) < 0.5)[:, None, None, None], alt, y)

    x = pick(x, x.flip(-1))
    if vertical:
        x = pick(x, x.flip(-2))
    if turns and x.shape[-1] == x.shape[-2]:
        x = pick(x, x.transpose(-1, -2))
    return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _blend(img: torch.Tensor, degenerate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + f * (img - degenerate), with USB's factor range f in [0.05, 0.95]."""
    f = (0.05 + 0.9 * u).view(-1, 1, 1, 1)
    return (degenerate + f * (img - degenerate)).clamp(0, 1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample with per-sample 2x3 matrices (normalised coordinates); outside pixels become mid grey, as USB."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def _eye(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(n, 1, 1)


def _rotate(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    a = (u * 60 - 30) * math.pi / 180
    t = _eye(len(x), x)
    t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    return _affine(x, t)


def _shear(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        t = _eye(len(x), x)
        t[:, axis, 1 - axis] = u * 0.6 - 0.3
        return _affine(x, t)

    return op


def _translate(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        t = _eye(len(x), x)
        t[:, axis, 2] = (u * 0.6 - 0.3) * 2  # fraction of the side; normalised coordinates span 2
        return _affine(x, t)

    return op


def _sharpness(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k / 13).expand(3, 1, 3, 3), groups=3)
    return _blend(x, smooth, u)


def _autocontrast(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _equalize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    v = (x * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float32))
    cdf = hist.cumsum(1)
    cdf_min = cdf.gather(1, v.min(1, keepdim=True).values)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1) * 255).clamp(0, 255)
    return (lut.gather(1, v) / 255).view(n, c, h, w).to(x.dtype)


def _posterize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    bits = (4 + (u * 5).floor().clamp(max=4)).long().view(-1, 1, 1, 1)
    v = (x * 255).round().long()
    return ((v >> (8 - bits)) << (8 - bits)).to(x.dtype) / 255


def _solarize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= u.view(-1, 1, 1, 1), 1 - x, x)


RANDAUGMENT_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "identity": lambda x, u: x,
    "autocontrast": _autocontrast,
    "brightness": lambda x, u: _blend(x, torch.zeros_like(x), u),
    "color": lambda x, u: _blend(x, _gray(x), u),
    "contrast": lambda x, u: _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), u),
    "equalize": _equalize,
    "posterize": _posterize,
    "rotate": _rotate,
    "sharpness": _sharpness,
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "solarize": _solarize,
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}


def randaugment(x: torch.Tensor, gen: torch.Generator, num_ops: int, cutout: float) -> torch.Tensor:
    """Each sample draws its own `num_ops` ops and magnitudes; then a cutout of random size, as USB does."""
    names = list(RANDAUGMENT_OPS)
    n = len(x)
    for _ in range(num_ops):
        choice = torch.randint(0, len(names), (n,), generator=gen, device=x.device)
        mag = _u(n, gen, x.device)
        # Samples sorted by their op, each op applied to its contiguous segment: one host sync per round (the
        # segment sizes), where selecting each op's samples by mask cost one sync per op.
        order = torch.argsort(choice, stable=True)
        xs, ms = x[order], mag[order]
        out, start = torch.empty_like(xs), 0
        for name, count in zip(names, torch.bincount(choice, minlength=len(names)).tolist()):
            if count:
                seg = slice(start, start + count)
                out[seg] = RANDAUGMENT_OPS[name](xs[seg], ms[seg]).to(x.dtype)
                start += count
        x = torch.empty_like(out).index_copy_(0, order, out)
    if cutout > 0:
        h, w = x.shape[-2:]
        side = (_u(n, gen, x.device) * cutout * min(h, w)).view(-1, 1, 1)
        cy, cx = (_u(n, gen, x.device) * h).view(-1, 1, 1), (_u(n, gen, x.device) * w).view(-1, 1, 1)
        yy = torch.arange(h, device=x.device).view(1, -1, 1)
        xx = torch.arange(w, device=x.device).view(1, 1, -1)
        box = ((yy - cy).abs() <= side / 2) & ((xx - cx).abs() <= side / 2)
        x = torch.where(box[:, None], torch.full_like(x, 0.5), x)
    return x


class Augmenter:
    """Builds the views an algorithm asks for from a batch of uint8 loader crops, on the batch's device."""

    def __init__(self, cfg: AugConfig, size: int):
        self.cfg, self.size = cfg, size

    def weak(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random native-resolution window + horizontal flip, as float in [0, 1]."""
        x = random_crops(x, self.size, gen)
        if self.cfg.flip:
            x = random_flips(x, gen)
        return x.float() / 255

    def strong(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.cfg.strong == "iqa_safe":
            return random_flips(random_crops(x, self.size, gen), gen, vertical=True, turns=True).float() / 255
        return randaugment(self.weak(x, gen), gen, self.cfg.randaugment_ops, self.cfg.cutout)
