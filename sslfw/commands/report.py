"""The pipeline's report: every method beside the floor (constant guess) and a classical ceiling (hand-made
features + ridge), SRCC first, and for each method its SRCC difference to supervised with a paired bootstrap 95%
interval (pairs: the same test image under the same seed), marked * only when the interval excludes 0."""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from sslfw import fsio, trace
from sslfw.commands import figures
from sslfw.config import LogConfig
from sslfw.data.labels import NUM_CLASSES
from sslfw.data.reader import ShardSet
from sslfw.data.shards import identity, load_index
from sslfw.data.truth import truth_levels
from sslfw.evaluate import score_of
from sslfw.logger import read_log
from sslfw.metrics import METRICS, constant_guess, iqa_metrics, level_recall, paired_bootstrap_srcc

COLUMNS = tuple(m.name for m in METRICS if m.name != "const_mae")  # the constant guess is a row of its own
BASELINE = "supervised"


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _recall(metrics: list[dict]) -> str:
    """Per-level recall (mean over seeds) as "r0/r1/r2/r3/r4": which levels a model can tell apart at all."""
    if not metrics or not all(metrics):
        return "-"
    return "/".join(f"{np.mean([m.get(f'recall_class{c}', np.nan) for m in metrics]):.2f}" for c in range(NUM_CLASSES))


def _level_recall(run: dict) -> dict:
    """recall_class{c} of a finished run, from its saved test predictions (eval.json files older than the recall
    columns have none)."""
    path = Path(run["eval"]) / "predictions.npz"
    if not path.is_file():
        return {}
    with np.load(path) as z:
        return level_recall(z["label"], z["probs"].argmax(1))


def reference_rows(shards: str, splits: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """{split: constant-guess and features + ridge metrics} (cached beside the report: they depend only on the
    shards)."""
    from sslfw.reference import reference_predictions

    index = load_index(Path(shards))
    sets = index["sets"]
    c = constant_guess(sets["train"]["class_counts"])
    refs = reference_predictions(shards, splits, index["label_scheme"])
    out = {}
    for split, ref in refs.items():
        true = np.repeat(np.arange(NUM_CLASSES), sets[split]["class_counts"])
        const = iqa_metrics(true, np.full(len(true), c), np.full(len(true), float(c)), np.full(len(true), np.nan), c)
        feats = iqa_metrics(ref["label"], ref["pred"], ref["score"], ref["mos"], c) | {"alpha": ref["alpha"]}
        out[split] = {"constant guess": const, "features + ridge": feats}
    return out


def _scores(run: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(MOS, predicted score) per test image of a finished run, from its saved predictions."""
    path = Path(run["eval"]) / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["mos"], score_of(z)


def _delta(done: list[dict], base: list[dict]) -> tuple[float, float, float, int] | None:
    """SRCC(method) - SRCC(supervised) and its 95% interval over the seeds both have, and how many."""
    a = {r["seed"]: s for r in done if (s := _scores(r))}
    b = {r["seed"]: s for r in base if (s := _scores(r))}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    mos = a[seeds[0]][0]
    return (*paired_bootstrap_srcc(mos, {s: a[s][1] for s in seeds}, {s: b[s][1] for s in seeds}), len(seeds))


def _delta_text(d: tuple[float, float, float, int] | None) -> str:
    return "-" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]{' *' if d[1] > 0 or d[2] < 0 else ''}"


def _figures(out: Path, results: dict[str, list[dict]], deltas: dict, split: str) -> dict[str, dict[str, int]]:
    """forest.png, scatter.png and reliability.png of the report's runs (the first seed of each method for the
    last two); {png: {method: seeds}} of those drawn."""
    first, probs = {}, {}
    for label, done in results.items():  # each method's first seed, its predictions read once
        path = Path(done[0]["eval"]) / "predictions.npz" if done else None
        if path and path.is_file():
            with np.load(path) as z:
                first[label] = (z["mos"], score_of(z))
                if not np.all(z["probs"].max(1) == 1.0):  # a score head's one-hot levels carry no confidence
                    probs[label] = (z["probs"], z["label"])
    drawn = {}
    for png in ("forest.png", "scatter.png", "reliability.png"):
        (out / png).unlink(missing_ok=True)  # an earlier report's, of other runs
    for png, made in (("forest.png", figures.forest(out / "forest.png", deltas, BASELINE, split)),
                      ("scatter.png", figures.score_scatter(out / "scatter.png", first, split)),
                      ("reliability.png", figures.reliability(out / "reliability.png", probs, split))):  # fmt: skip
        if made:
            drawn[png] = {label: len(results[label]) for label in results}
    return drawn


def _diagnostics(done: list[dict], truth: dict[str, int] | None, series: dict[str, dict]) -> tuple[str, str, str]:
    """(mean unlabelled mask ratio over the SSL stage's logged steps, accuracy against the hidden truth of the
    pseudo-labels that passed the threshold during training (from each run's trace `series`), and of the pool's
    pseudo-labels after the SSL stage), each mean ± std over seeds."""
    masks, used, accs = [], [], []
    for r in done:
        if (s := series.get(r["dir"])) is not None and np.isfinite(s["overall_used_acc"]):
            used.append(float(s["overall_used_acc"]))
        rows = read_log(Path(r["dir"]) / "ssl")
        vals = [x["train/mask_ratio"] for x in rows if "train/mask_ratio" in x]
        if vals:
            masks.append(float(np.mean(vals)))
        pseudo = Path(r["pseudo"])
        if truth and pseudo.is_file():
            with open(pseudo, newline="") as f:
                pairs = [(int(x["label"]), truth[x["key"]]) for x in csv.DictReader(f) if x["key"] in truth]
            if pairs:
                accs.append(float(np.mean([a == b for a, b in pairs])))
    return _fmt(masks), _fmt(used), _fmt(accs)


def _markdown(split: str, setting: str, what: str, truth: str, table: str, plots: str) -> str:
    return (
        f"# sslfw pipeline report ({split} split, {setting})\n\n"
        f"Metrics of the final model ({what}), mean ± std over seeds. SRCC/PLCC are of the predicted score "
        f"(a classifier's expected level, a score head's MOS) against MOS. The constant guess always answers the "
        f"median training level; features + ridge is a classical no-reference model trained on the same labelled "
        f"images (`sslfw/reference.py`). Δsrcc: paired bootstrap over the {split} images and seeds; * when the 95% "
        f"interval excludes 0. recall by level: share of each "
        f"true level predicted exactly. mask_ratio: mean share of unlabelled images above the threshold over the SSL "
        f"stage; used_acc: pseudo-labels that passed the threshold during the SSL stage, against the hidden truth "
        f"(pseudo_labels.png shows both over training); pseudo_acc: the pool's pseudo-labels after the SSL stage "
        f"against the hidden truth"
        f"{' (' + truth + ')' if truth else ' (no truth file given)'}.\n\n{table}\n\n"
        f"Plots of this report's runs (seeds per method): {plots or 'none (no run logged a curve)'}.\n"
    )


def write_report(
    out: Path,
    shards: str,
    split: str,
    setting: str,
    results: dict[str, list[dict]],
    truth: str = "",
    retrained: bool = True,
    retrain_dir: str = "retrain",
) -> None:
    cache, val_cache = out / "reference.json", out / "reference_val.json"  # the eval split's and val's
    if not (cache.is_file() and val_cache.is_file()):
        both = reference_rows(shards, (split, "val"))
        fsio.write_json(cache, both[split])
        fsio.write_json(val_cache, both["val"])
    refs, val_refs = json.loads(cache.read_text()), json.loads(val_cache.read_text())
    header = ["method", "seeds", COLUMNS[0], f"Δsrcc vs {BASELINE} [95% CI]", *COLUMNS[1:], "recall by level 0/1/2/3/4",
              "ssl_stage_srcc", "mask_ratio", "used_acc", "pseudo_acc"]  # fmt: skip
    rows = []
    for name, m in refs.items():  # reference rows: one value each, no seeds, no SSL diagnostics
        cells = {k: _fmt([m[k]]) if k in m else "-" for k in COLUMNS}
        rows.append([name, "-", cells[COLUMNS[0]], "-", *(cells[k] for k in COLUMNS[1:]), _recall([m]), *["-"] * 4])
    truth = truth if truth and Path(truth).is_file() else ""  # real data has no hidden truth: the column stays empty
    index = load_index(Path(shards))
    levels = truth_levels(truth, ShardSet(shards, split), index["label_scheme"]) if truth else None
    data, dirs = identity(index), [r["dir"] for done in results.values() for r in done]
    series = {d: trace.accuracy_series(Path(d) / "ssl", data, levels, 25) for d in dirs} if levels else {}  # one read
    base, deltas = results.get(BASELINE, []), {}
    for label, done in results.items():
        final = {k: _fmt([r["final"][k] for r in done if k in r["final"]]) for k in COLUMNS}
        if label != BASELINE and (d := _delta(done, base)) is not None:
            deltas[label] = d
        delta = "-" if label == BASELINE else _delta_text(deltas.get(label))
        ssl = _fmt([r["ssl"]["srcc"] for r in done if "ssl" in r and "srcc" in r["ssl"]])
        mask, used, acc = _diagnostics(done, levels, series) if label != BASELINE else ("-", "-", "-")
        rows.append([label, str(len(done)), final[COLUMNS[0]], delta, *(final[k] for k in COLUMNS[1:]),
                     _recall([_level_recall(r) for r in done]), ssl, mask, used, acc])  # fmt: skip
    fsio.write_csv(out / "report.csv", header, rows)
    what = (
        "after retraining on pseudo-labels for SSL rows; `ssl_stage_srcc` is the SSL model itself"
        if retrained
        else "SSL rows: the SSL model itself, this pipeline ran no retraining"
    )
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
    runs = {Path(r["dir"]).name for done in results.values() for r in done}  # the report's runs, not all in `out`
    drawn = {"learning_curves.png": learning_curves(out, runs, val_refs, retrain_dir)}
    (out / "pseudo_labels.png").unlink(missing_ok=True)  # an earlier report's, of other runs or another truth
    if levels:
        drawn["pseudo_labels.png"] = pseudo_label_curves(out, series, 25)
    drawn |= _figures(out, results, deltas, split)
    plots = "; ".join(f"{png}: {', '.join(f'{m} ({n})' for m, n in d.items())}" for png, d in drawn.items() if d)
    fsio.write_text(out / "report.md", _markdown(split, setting, what, truth, table, plots))


def report_to_wandb(out: Path, log: LogConfig, group: str, pipeline: dict, confusions: list[Path]) -> None:
    """The report as a W&B table, with the learning curves and its runs' test confusion matrices as images, in a
    "report" run of the pipeline's group (out/wandb_report)."""
    from sslfw.logger import RunLogger

    (out / "wandb_report").mkdir(parents=True, exist_ok=True)
    logger = RunLogger(out / "wandb_report", True, replace(log, name=f"{group}/report", group=group,
                       job_type="report", tags=["report"]), {"pipeline": pipeline}, 0)  # fmt: skip
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.reader(f))
    logger.log_table("report", rows[0], rows[1:])
    for png in ("learning_curves", "pseudo_labels", "forest", "scatter", "reliability"):  # those this report drew
        logger.log_image(png, out / f"{png}.png")
    for png in sorted(p for p in confusions if p.is_file()):
        logger.log_image(f"confusion/{png.parent.parent.name}", png)
    logger.close()


Curve = tuple[np.ndarray, np.ndarray, np.ndarray, int]


def _curves(out: Path, runs: set[str], stage: str, key: str) -> dict[str, Curve]:
    """method -> (steps, mean, std over seeds, seeds) of `key` in each run's `stage`/metrics.jsonl, on the steps every
    seed logged."""
    by_method: dict[str, list[dict[int, float]]] = {}
    for run in sorted(runs):
        pts = {r["step"]: r[key] for r in read_log(out / run / stage) if key in r}
        if pts:
            by_method.setdefault(run.rsplit("-s", 1)[0], []).append(pts)
    curves = {}
    for method, seeds in by_method.items():
        steps = sorted(set.intersection(*(set(p) for p in seeds)))
        vals = np.array([[p[s] for s in steps] for p in seeds])
        std = vals.std(0, ddof=1) if len(seeds) > 1 else 0 * vals[0]
        curves[method] = (np.array(steps), vals.mean(0), std, len(seeds))
    return curves


def _band(
    ax, colours: dict[str, int], method: str, steps, mean, std, seeds: int, ls: str | None = None, label: bool = True
):
    """One method's mean line and ±1 std band over `seeds` seeds (said in the legend), its colour fixed across
    panels; past 10 methods the line style and marker tell them apart."""
    k = colours.setdefault(method, len(colours))
    c = f"C{k % 10}"
    ax.plot(steps, mean, marker="os^D"[k // 10 % 4], ms=3, color=c, ls=ls or ("-", "--", "-.", ":")[k // 10 % 4],
            label=f"{method} ({seeds} seed{'s' if seeds != 1 else ''})" if label else None)  # fmt: skip
    ax.fill_between(steps, mean - std, mean + std, color=c, alpha=0.2)


def _learning_multiples(out: Path, runs: set[str], refs: dict[str, dict], retrain_dir: str) -> dict[str, int]:
    """Small multiples: one panel per method, its val SRCC over the SSL stage (solid) and retraining (dashed),
    with supervised's in grey and the reference rows as lines in every panel."""
    fig, axes = figures._grid(len(_curves(out, runs, "ssl", "val/ema/srcc")) - 1)
    ssl, again = (_curves(out, runs, stage, "val/ema/srcc") for stage in ("ssl", retrain_dir))
    base = ssl.pop(BASELINE, None)
    for ax, (method, (steps, mean, std, seeds)) in zip(axes, ssl.items()):
        if base is not None:
            ax.plot(
                base[0], base[1], color="grey", lw=1, label=f"{BASELINE} ({base[3]} seed{'s' if base[3] != 1 else ''})"
            )
        ax.plot(steps, mean, color="C0", marker="o", ms=3, label="SSL stage")
        ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.2)
        if method in again:
            ax.plot(again[method][0], again[method][1], color="C1", ls="--", marker="s", ms=3, label="retraining")
        for (name, m), style in zip(refs.items(), (":", "--")):
            if np.isfinite(m.get("srcc", np.nan)):
                ax.axhline(m["srcc"], color="black", ls=style, lw=0.8, label=f"{name} (val)")
        ax.set(title=f"{method} ({seeds} seed{'s' if seeds != 1 else ''})", xlabel="step", ylabel="val SRCC")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    _figure_end(fig, np.array(list(axes)), out / "learning_curves.png", "Learning curves, one panel per method", 5)
    return {m: c[3] for m, c in ssl.items()} | ({BASELINE: base[3]} if base is not None else {})


def _figure_end(fig, axes, out_png: Path, title: str, ncol_max: int) -> None:
    """Shared legend under the panels, title, atomic save."""
    import matplotlib.pyplot as plt

    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    ncol = min(len(handles), ncol_max)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(title)
    rows = -(-len(handles) // max(ncol, 1))
    fig.tight_layout(rect=(0, min(0.3, 0.03 + 0.035 * rows), 1, 1))
    with fsio.atomic_open(out_png) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def pseudo_label_curves(out: Path, per_run: dict[str, dict | None], bin_steps: int) -> dict[str, int]:
    """Pseudo-labels over the SSL stage, from each run's trace against the hidden truth (`per_run`: run folder ->
    `trace.accuracy_series`): accuracy of those that passed the threshold (solid) and of all (dotted), and the share
    that passed; mean ± std over seeds. Returns the seeds drawn per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for run, s in sorted(per_run.items()):
        if s is not None:
            series.setdefault(Path(run).name.rsplit("-s", 1)[0], []).append(s)
    if not series:
        return {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), squeeze=False)
    colours: dict[str, int] = {}
    for method, runs in series.items():
        n = min(len(r["step"]) for r in runs)  # the steps every seed reached
        steps = runs[0]["step"][:n]
        for ax, key, ls in ((axes[0][0], "used_acc", None), (axes[0][0], "all_acc", ":"), (axes[0][1], "mask", None)):
            vals = np.array([r[key][:n] for r in runs])
            with warnings.catch_warnings():  # a bin where no seed passed a pseudo-label is NaN: a gap in the line
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(vals, 0), np.nanstd(vals, 0, ddof=1) if len(runs) > 1 else 0 * vals[0]
            _band(ax, colours, method, steps, mean, std, len(runs), ls=ls, label=key != "all_acc")
        if len(series) <= 3:  # how many passed in each bin (mean over seeds), beside the accuracy they had
            used = np.mean([r["used"][:n] for r in runs], 0)
            acc = np.nanmean([r["used_acc"][:n] for r in runs], 0)
            for x, y, count in zip(steps, acc, used):
                if np.isfinite(y):
                    axes[0][0].annotate(f"{count:.0f}", (x, y), textcoords="offset points", xytext=(0, 5),
                                        ha="center", fontsize=7, color=f"C{colours[method] % 10}")  # fmt: skip
    axes[0][0].set(xlabel="step", ylabel="accuracy against the hidden truth",
                   title="passed the threshold (solid, with how many), all (dotted)")  # fmt: skip
    axes[0][1].set(xlabel="step", ylabel="share of unlabelled images", title="passed the threshold (mask ratio)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    _figure_end(fig, axes, out / "pseudo_labels.png", f"Pseudo-labels over training ({bin_steps}-step bins, "
                "mean ± std over seeds)", 4)  # fmt: skip
    return {m: len(r) for m, r in series.items()}


def learning_curves(
    out: Path, runs: set[str], refs: dict[str, dict] | None = None, retrain_dir: str = "retrain"
) -> dict[str, int]:
    """Validation SRCC and MAE of the EMA weights over training of the named runs (folders in `out`), SSL stage and
    retraining side by side: mean over seeds with a +-1 std band; the reference rows (measured on val) as lines.
    Returns the seeds drawn per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = refs or {}
    if len(_curves(out, runs, "ssl", "val/ema/srcc")) > 6:  # past ~6 colours a shared axis cannot be read
        return _learning_multiples(out, runs, refs, retrain_dir)
    stages = [("ssl", "SSL stage (supervised: its only stage)"), (retrain_dir, "retraining on pseudo-labels")]
    if not _curves(out, runs, retrain_dir, "val/ema/srcc"):  # SSL stages only: no empty retraining panel
        stages = stages[:1]
    fig, axes = plt.subplots(2, len(stages), figsize=(5.5 * len(stages) + 0.5, 7), sharex="col", squeeze=False)
    colours: dict[str, int] = {}
    drawn: dict[str, int] = {}
    for col, (stage, title) in enumerate(stages):
        for row, (metric, label) in enumerate((("srcc", "val SRCC (higher is better)"), ("mae", "val MAE"))):
            ax = axes[row][col]
            curves = _curves(out, runs, stage, f"val/ema/{metric}")
            if stage == retrain_dir:  # the baseline beside the retrained models: its one stage is their competitor
                curves |= {m: c for m, c in _curves(out, runs, "ssl", f"val/ema/{metric}").items() if m == BASELINE}
            for method, (steps, mean, std, seeds) in curves.items():
                _band(ax, colours, method, steps, mean, std, seeds)
                drawn[method] = max(drawn.get(method, 0), seeds)
            for (name, m), style in zip(refs.items(), (":", "--")):
                if metric in m and np.isfinite(m[metric]):
                    ax.axhline(m[metric], color="grey", ls=style, lw=1, label=f"{name} (val)")
            ax.set(ylabel=label, title=title if row == 0 else None)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("step")
    _figure_end(fig, axes, out / "learning_curves.png", "Learning curves: mean ± std over seeds",
                5 if len(stages) > 1 else 2)  # fmt: skip
    return drawn
