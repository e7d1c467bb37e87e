"""IQA metrics over gathered predictions. Every MAE comes with the constant-guess MAE beside it, because on
KonIQ's skewed classes always answering the majority level already scores MAE 0.55 (docs/NOTES.md, Labels)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from sslfw.data.labels import NUM_CLASSES


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    what: str


# The one list of reported metrics, in report order (SRCC first: the paper's MAE columns beside the honest ones):
# eval.md and the pipeline report print these, W&B keeps each one's best value (max or min) as the run's summary.
METRICS = (
    Metric("srcc", True, "Spearman rank correlation of the predicted score with MOS"),
    Metric("mae", False, "mean absolute error in levels"),
    Metric("const_mae", False, "MAE of always answering the median training level"),
    Metric("plcc", True, "Pearson correlation of the predicted score with MOS"),
    Metric("mae_class3", False, "MAE on images whose true level is 3"),
    Metric("mae_class4", False, "MAE on images whose true level is 4"),
    Metric("mae_class34", False, "MAE on true levels 3 and 4 (the paper's)"),
    Metric("macro_mae", False, "MAE averaged over the five true levels"),
    Metric("accuracy", True, "share of images at their exact level"),
    Metric("qwk", True, "quadratic weighted kappa"),
)


def best_summaries(prefixes: list[str]) -> dict[str, str]:
    """{"PREFIX/metric": "max" | "min"} for W&B's define_metric: a run's summary is its best evaluation, not its
    last."""
    return {f"{p}/{m.name}": "max" if m.higher_is_better else "min" for p in prefixes for m in METRICS}


def quadratic_weighted_kappa(y: np.ndarray, p: np.ndarray, k: int = NUM_CLASSES) -> float:
    observed = np.zeros((k, k))
    np.add.at(observed, (y, p), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(len(y), 1)
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2 / (k - 1) ** 2
    den = (w * expected).sum()
    return float(1 - (w * observed).sum() / den) if den > 0 else float("nan")


def iqa_metrics(true: np.ndarray, pred: np.ndarray, score: np.ndarray, mos: np.ndarray, constant: int) -> dict:
    """`true`/`pred` levels 0..4, `score` expected level, `mos` (NaN where unknown), `constant` the guessed level."""
    true, pred = np.asarray(true, int), np.asarray(pred, int)
    err = np.abs(true - pred)
    out: dict = {
        "n": int(len(true)),
        "mae": float(err.mean()),
        "accuracy": float((true == pred).mean()),
        "const_mae": float(np.abs(true - constant).mean()),
        "qwk": quadratic_weighted_kappa(true, pred),
    }
    per_class = {c: float(err[true == c].mean()) for c in range(NUM_CLASSES) if (true == c).any()}
    out |= {f"mae_class{c}": v for c, v in per_class.items()}
    out |= level_recall(true, pred)
    out["macro_mae"] = float(np.mean(list(per_class.values())))
    hi = np.isin(true, (3, 4))
    if hi.any():  # the paper's "MAE of 3&4"
        out["mae_class34"] = float(err[hi].mean())
    known = np.isfinite(mos)
    if known.sum() > 2 and np.ptp(score[known]) > 0:
        out["srcc"] = float(stats.spearmanr(score[known], mos[known]).statistic)
        out["plcc"] = float(stats.pearsonr(score[known], mos[known]).statistic)
    return out


def calibration_error(probs: np.ndarray, true: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the |confidence - accuracy| gap of the top class, averaged over 10 equal-width
    confidence bins weighted by their share of samples. A threshold on confidence means what it says only when this
    is small, so it is logged with every evaluation."""
    if len(true) == 0:
        return float("nan")
    conf, hit = probs.max(-1), probs.argmax(-1) == np.asarray(true)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(abs(conf[which == b].mean() - hit[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))  # fmt: skip


def level_recall(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """recall_class{c}: the share of each true level (present in `true`) predicted exactly."""
    true, pred = np.asarray(true, int), np.asarray(pred, int)
    return {f"recall_class{c}": float((pred[true == c] == c).mean()) for c in range(NUM_CLASSES) if (true == c).any()}


def constant_guess(class_counts: list[int]) -> int:
    """The level that minimises MAE when always guessed: the median training label."""
    cum = np.cumsum(class_counts)
    return int(np.searchsorted(cum, cum[-1] / 2))


def _srcc_rows(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of `scores` (R, n) with the matching row of `target` (R, n)."""
    rs, rt = stats.rankdata(scores, axis=1), stats.rankdata(target, axis=1)
    rs, rt = rs - rs.mean(1, keepdims=True), rt - rt.mean(1, keepdims=True)
    return (rs * rt).sum(1) / np.sqrt((rs * rs).sum(1) * (rt * rt).sum(1) + 1e-300)


def paired_bootstrap_srcc(
    target: np.ndarray, a: dict[int, np.ndarray], b: dict[int, np.ndarray], reps: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over seeds of SRCC(a) - SRCC(b) against `target` (MOS), with a 95% percentile interval from resampling
    test images; pairs are the same image under the same seed, so image difficulty and seed cancel."""
    seeds = sorted(set(a) & set(b))
    known = ~np.isnan(target)
    t = target[known]
    rng = np.random.default_rng(seed)
    ix = rng.integers(0, len(t), size=(reps, len(t)))
    point = np.mean([stats.spearmanr(a[s][known], t).statistic - stats.spearmanr(b[s][known], t).statistic
                     for s in seeds])  # fmt: skip
    diffs = np.mean([_srcc_rows(a[s][known][ix], t[ix]) - _srcc_rows(b[s][known][ix], t[ix]) for s in seeds], 0)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(point), float(lo), float(hi)
