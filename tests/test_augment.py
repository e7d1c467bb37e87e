"""Per-sample batched augmentation: own parameters per sample, reproducible per seed, right dtype and range, and
`iqa_safe` only ever moves pixels."""

from __future__ import annotations

import itertools

import pytest
import torch

from sslfw.augment import RANDAUGMENT_OPS, Augmenter, random_crops
from sslfw.config import AugConfig


def images(n: int = 6, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", ["iqa_safe", "randaugment"])
def test_same_seed_same_views_and_float_range(policy):
    aug = Augmenter(AugConfig(strong=policy), 12)
    x = images()
    a, b, c = (aug.strong(x, gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == (6, 3, 12, 12)
    assert a.min() >= 0 and a.max() <= 1


def test_each_sample_gets_its_own_parameters():
    """Identical input images must come out different: the crop window and flips are drawn per sample."""
    x = images(n=1).expand(16, -1, -1, -1).contiguous()
    for view in (
        Augmenter(AugConfig(), 12).weak(x, gen()),
        Augmenter(AugConfig(strong="randaugment"), 12).strong(x, gen()),
    ):
        distinct = {view[i].numpy().tobytes() for i in range(16)}
        assert len(distinct) > 8


def test_random_crops_are_exact_windows():
    x = images(n=4)
    g = gen(3)
    crops = random_crops(x, 10, g)
    g = gen(3)
    ys = torch.randint(0, 20 - 10 + 1, (4,), generator=g)
    xs = torch.randint(0, 24 - 10 + 1, (4,), generator=g)
    for i in range(4):
        assert torch.equal(crops[i], x[i, :, ys[i] : ys[i] + 10, xs[i] : xs[i] + 10])


def _dihedral(t: torch.Tensor):
    for turns, flip in itertools.product(range(4), (False, True)):
        y = torch.rot90(t, turns, dims=(-2, -1))
        yield y.flip(-1) if flip else y


def test_iqa_safe_only_moves_pixels():
    """Every iqa_safe view equals a window of the original under one of the 8 square symmetries, bit for bit."""
    x = images(n=8, h=14, w=16, seed=5)
    views = Augmenter(AugConfig(strong="iqa_safe"), 8).strong(x, gen(4))
    for i in range(8):
        target = (views[i] * 255).round().to(torch.uint8)
        found = any(
            torch.equal(target, window)
            for y0 in range(14 - 8 + 1)
            for x0 in range(16 - 8 + 1)
            for window in _dihedral(x[i, :, y0 : y0 + 8, x0 : x0 + 8])
        )
        assert found, f"sample {i} is not a geometric copy of its input"


def test_randaugment_changes_values_and_every_op_runs():
    x = images(n=4).float() / 255
    u = torch.linspace(0.1, 0.9, 4)
    changed = 0
    for name, op in RANDAUGMENT_OPS.items():
        y = op(x, u)
        assert y.shape == x.shape and torch.isfinite(y).all(), name
        changed += not torch.allclose(y, x)
    assert changed == len(RANDAUGMENT_OPS) - 1  # all but identity
    weak = Augmenter(AugConfig(strong="randaugment", cutout=0.0), 12)
    assert not torch.equal(weak.strong(images(), gen(0)), weak.weak(images(), gen(0)))


def test_randaugment_by_segments_equals_each_sample_alone():
    """The sorted-segment RandAugment (one host sync per round) gives every sample exactly what its drawn ops give it
    alone: the per-op masking it replaced, recomputed here sample by sample from the same generator draws."""
    from sslfw.augment import _u, randaugment

    x = images(n=40, h=16, w=16, seed=3).float() / 255
    got = randaugment(x, gen(5), num_ops=2, cutout=0.0)
    g, names, want = gen(5), list(RANDAUGMENT_OPS), x.clone()
    for _ in range(2):
        choice, mag = torch.randint(0, len(names), (40,), generator=g), _u(40, g, x.device)
        want = torch.cat([RANDAUGMENT_OPS[names[c]](want[i : i + 1], mag[i : i + 1]) for i, c in enumerate(choice)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
