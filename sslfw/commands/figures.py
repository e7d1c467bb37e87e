"""The report's figures beyond the learning curves: the paired SRCC differences as a forest plot, predicted score
against MOS, and a reliability diagram. Each method gets its own panel once there are more than a few (small
multiples), so no figure asks a reader to tell ten colours apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sslfw import fsio
from sslfw.metrics import calibration_error


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with fsio.atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    _plt().close(fig)


def _grid(n: int, size: float = 3.2):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = _plt().subplots(rows, cols, figsize=(size * cols + 0.4, size * rows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat[:n]


def forest(path: Path, deltas: dict[str, tuple[float, float, float, int]], baseline: str, split: str) -> bool:
    """Each method's SRCC minus the baseline's with its paired 95% interval; filled where it excludes 0."""
    if not deltas:
        return False
    plt = _plt()
    names = list(deltas)[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.6))
    for y, name in enumerate(names):
        d, lo, hi, seeds = deltas[name]
        colour = "C0" if lo > 0 else "C3" if hi < 0 else "grey"  # better, worse, not told apart
        ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o", color=colour, capsize=3,
                    mfc="white" if colour == "grey" else colour)  # fmt: skip
        label = f"  {d:+.3f} [{lo:+.3f}, {hi:+.3f}] ({seeds} seed{'s' if seeds != 1 else ''})"
        ax.text(max(hi, 0), y, label, va="center", fontsize=8)  # right of the zero line, never across it
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"{split} SRCC minus {baseline}'s\n(paired bootstrap 95% interval; filled: it excludes 0)")
    lo_all = min(v[1] for v in deltas.values())
    hi_all = max(v[2] for v in deltas.values())
    ax.set_xlim(min(lo_all, 0) - 0.01, max(hi_all, 0) + 0.06 + 0.5 * (hi_all - lo_all))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def score_scatter(path: Path, scores: dict[str, tuple[np.ndarray, np.ndarray]], split: str) -> bool:
    """Predicted score against MOS, one panel per method (its first seed), SRCC in the title."""
    from scipy import stats

    if not scores:
        return False
    fig, axes = _grid(len(scores))
    for ax, (name, (mos, score)) in zip(axes, scores.items()):
        known = ~np.isnan(mos)
        ax.scatter(mos[known], score[known], s=4, alpha=0.35, color="C0", lw=0)
        srcc = stats.spearmanr(mos[known], score[known]).statistic
        ax.set(title=f"{name}\nSRCC {srcc:.3f}", xlabel="MOS", ylabel="predicted score")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Predicted score against MOS ({split}, first seed of each method)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def reliability(path: Path, probs: dict[str, tuple[np.ndarray, np.ndarray]], split: str, bins: int = 10) -> bool:
    """Accuracy against confidence in equal-width bins, one panel per classifier (its first seed), with the number
    of images per bin: a point on the diagonal is calibrated; ECE is the count-weighted gap."""
    if not probs:
        return False
    fig, axes = _grid(len(probs))
    edges = np.linspace(0, 1, bins + 1)
    for ax, (name, (p, label)) in zip(axes, probs.items()):
        conf, right = p.max(1), p.argmax(1) == label
        which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
        counts = np.bincount(which, minlength=bins)
        acc = np.bincount(which, weights=right, minlength=bins) / np.maximum(counts, 1)
        mid = (edges[:-1] + edges[1:]) / 2
        keep = counts > 0
        ece = calibration_error(p, label, bins)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.bar(mid[keep], acc[keep], width=1 / bins, alpha=0.5, edgecolor="C0", color="C0")
        for x, y, n in zip(mid[keep], acc[keep], counts[keep]):
            ax.text(x, min(y + 0.02, 0.97), str(n), ha="center", fontsize=6)
        ax.set(title=f"{name}\nECE {ece:.3f}", xlabel="confidence", ylabel="accuracy", xlim=(0, 1),
               ylim=(0, 1))  # fmt: skip
        ax.title.set_fontsize(9)
    fig.suptitle(f"Reliability ({split}, first seed; numbers: images per bin)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True
