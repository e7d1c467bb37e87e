"""`sslfw eval`: a checkpoint on a split, sharded across ranks and gathered; JSON, markdown and a confusion PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sslfw import ckpt, fsio
from sslfw.data.labels import NUM_CLASSES
from sslfw.data.reader import ShardSet
from sslfw.data.shards import identity, load_index
from sslfw.dist import autocast_for, make_accelerator
from sslfw.errors import DataError
from sslfw.evaluate import Evaluator, metrics_from_predictions
from sslfw.inference import load_model
from sslfw.logger import log_into_run
from sslfw.metrics import METRICS, constant_guess
from sslfw.rundir import lock_on_main


def run_eval(
    checkpoint: Path,
    split: str = "test",
    weights: str = "ema",
    crops: int = 1,
    out: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    shards: Path | None = None,
    to_wandb: bool = True,
) -> dict:
    acc = make_accelerator()
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"--out {out}: is a file; give a folder for eval.json, eval.md and confusion.png")
    model, cfg, ckpt_dir = load_model(checkpoint, weights)
    model.to(acc.device)
    root = Path(shards or cfg.data.shards)
    index = load_index(root)
    trained = ckpt.recorded_data(ckpt_dir)
    edges = identity(index)["label_edges"]
    if trained and trained["label_edges"] != edges:
        raise DataError(
            f"--shards {root}: its levels are cut at MOS {edges}, {ckpt_dir} was trained "
            f"with {trained['label_edges']}; the metrics would compare different levels. Evaluate on shards packed "
            f"with the same --bins"
        )
    data = ShardSet(root, split, cfg.data.jpeg_on_device)
    if len(data) == 0:
        raise DataError(f"{root}: split {split!r} has no samples; choose another --split")
    lock = lock_on_main(Path(out), f"sslfw eval (--out {out})", acc.is_main_process, acc.device) if out else None
    constant = constant_guess(index["sets"]["train"]["class_counts"])
    evaluator = Evaluator(data, cfg.model.img_size, batch_size, num_workers, acc, autocast_for(acc), constant, crops)
    pred = evaluator.predict(model)
    metrics = metrics_from_predictions(pred, constant)
    result = {
        "checkpoint": str(ckpt_dir),
        "checkpoint_sha256": ckpt.recorded_sha256(ckpt_dir),  # resolve() checked it against the file
        "weights": weights,
        "split": split,
        "crops": crops,
        "split_sha256": index["split"]["sha256"],
        "metrics": metrics,
    }
    if out is not None and acc.is_main_process:
        out = Path(out)
        with fsio.atomic_open(out / "predictions.npz") as f:  # per image: paired comparisons between runs
            np.savez(f, **{k: pred[k] for k in ("idx", "label", "mos", "probs", "score")})
        fsio.write_json(out / "eval.json", result)
        fsio.write_text(out / "eval.md", markdown(result))
        title = f"{'/'.join(Path(ckpt_dir).resolve().parts[-3:])}, {split}, {weights} weights"  # run / stage / step-N
        confusion_png(pred["label"], pred["probs"].argmax(1), out / "confusion.png", title)
    if to_wandb and acc.is_main_process:  # into the run it evaluated (the pipeline reports to its own run instead)
        step = int(ckpt.info(ckpt_dir).get("step", 0))
        logged = {f"eval/{split}/{weights}/{k}": v for k, v in metrics.items()}
        images = {f"eval/{split}/{weights}/confusion": Path(out) / "confusion.png"} if out is not None else {}
        log_into_run(ckpt_dir.parent, cfg.log, step, logged, images)
    if lock is not None:
        lock.release()
    return result


def markdown(result: dict) -> str:
    m = result["metrics"]
    rows = "\n".join(f"| {x.name} | {m[x.name]:.4f} |" for x in METRICS if x.name in m)
    return (
        f"# Evaluation: {result['split']} ({m['n']} images), {result['weights']} weights, "
        f"{'whole-image tiles' if result['crops'] == 0 else str(result['crops']) + ' crop(s)'}\n\n"
        f"Checkpoint `{result['checkpoint']}`, split sha256 `{result['split_sha256'][:12]}`.\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


def confusion_png(true: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    """Counts and row-normalised (per true level: recall on the diagonal) confusion matrices side by side, each with
    its colour bar; `title` names the split, weights and checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=int)
    np.add.at(cm, (true.astype(int), pred.astype(int)), 1)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, data, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], rows, ".2f", "share of each true level")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9) if name == "counts" else 1)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        for i in range(NUM_CLASSES):
            for j in range(NUM_CLASSES):
                dark = data[i, j] > (data.max() if name == "counts" else 1) / 2
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", color="white" if dark else "black")
        ticks = range(NUM_CLASSES)
        ax.set(xlabel="predicted level", ylabel="true level", title=name, xticks=ticks, yticks=ticks)
    fig.suptitle(f"{title}: {len(true)} images", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
