"""Sharded prediction and evaluation: each rank predicts its slice, predictions are gathered, metrics computed.

No rank evaluates everything, and the gathered indices are checked to cover the set exactly once. Predictions are
class probabilities, averaged over crops when several native-resolution crops are asked for.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sslfw.data.jpeg import images_on
from sslfw.data.labels import NUM_CLASSES
from sslfw.data.reader import ShardSet
from sslfw.data.stream import EvalStream, make_loader
from sslfw.dist import gather_objects
from sslfw.metrics import calibration_error, iqa_metrics
from sslfw.model import expected_score


@torch.no_grad()
def predict_batch(model: nn.Module, batch: dict, device: torch.device, autocast) -> dict[str, np.ndarray]:
    """idx, label, mos, key, crop-averaged class probabilities and the continuous `score` of one loader batch (model
    in eval mode). The score is the expected level for a classifier and the predicted MOS for a model with a score
    head, whose levels (one-hot `probs`) are that MOS read through the edges it was trained with."""
    x = images_on(batch, device).float() / 255
    crops = x.shape[1] if x.ndim == 5 else 1
    with autocast():
        out = model(x.flatten(0, 1) if x.ndim == 5 else x)
    per_view = out["mos"].float()[:, None] if "mos" in out else out["logits"].float().softmax(-1)
    if "tiles" in batch:  # whole-image tiles: a variable number per image, averaged per image
        counts = batch["tiles"].to(device)
        owner = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        per_image = torch.zeros(len(counts), per_view.shape[-1], device=device)
        per_image = per_image.index_add_(0, owner, per_view) / counts[:, None]
    else:
        per_image = per_view.view(len(x), crops, -1).mean(1)
    if "mos" in out:
        score = per_image[:, 0]
        probs = nn.functional.one_hot(model.levels(score), NUM_CLASSES).float()
    else:
        probs, score = per_image, expected_score(per_image)
    return {
        "probs": probs.cpu().numpy(),
        "score": score.cpu().numpy(),
        "key": np.array(batch["key"]),
        **{k: batch[k].numpy() for k in ("idx", "label", "mos")},
    }


def score_of(pred) -> np.ndarray:
    """The continuous prediction of saved predictions; files written before sslfw saved it hold only the class
    probabilities, whose expected level it was."""
    return pred["score"] if "score" in pred else expected_score(torch.from_numpy(pred["probs"])).numpy()


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {
            "idx": np.zeros(0, dtype=np.int64),
            "label": np.zeros(0, dtype=np.int64),
            "mos": np.zeros(0),
            "probs": np.zeros((0, NUM_CLASSES)),
            "score": np.zeros(0),
            "key": np.zeros(0, dtype=str),
        }
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def predict_stream(
    model: nn.Module, stream: EvalStream, num_workers: int, device: torch.device, autocast
) -> dict[str, np.ndarray]:
    """Predictions for what `stream` yields on this rank (no communication)."""
    was_training = model.training
    model.eval()
    parts = [predict_batch(model, batch, device, autocast) for batch in make_loader(stream, num_workers)]
    model.train(was_training)
    return concat(parts)


def predict(
    model: nn.Module,
    shards: ShardSet,
    img_size: int,
    batch_size: int,
    num_workers: int,
    rank: int,
    world: int,
    device: torch.device,
    autocast,
    crops: int = 1,
) -> dict[str, np.ndarray]:
    """Predictions for the whole set, gathered from all ranks, sorted by sample index, checked exactly-once."""
    stream = EvalStream(shards, batch_size, (img_size, img_size), rank, world, crops=crops)
    ranks = gather_objects(predict_stream(model, stream, num_workers, device, autocast))
    out = {k: np.concatenate([r[k] for r in ranks]) for k in ranks[0]}
    order = np.argsort(out["idx"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if not np.array_equal(out["idx"], np.arange(len(shards))):
        raise RuntimeError(
            f"evaluation of {shards.name} covered {len(np.unique(out['idx']))} distinct of "
            f"{len(shards)} samples with {len(out['idx'])} predictions: the split is broken"
        )
    return out


def metrics_from_predictions(pred: dict[str, np.ndarray], constant: int) -> dict:
    """IQA metrics of gathered predictions; a score head's one-hot levels carry no confidence (NaN)."""
    out = iqa_metrics(pred["label"], pred["probs"].argmax(-1), pred["score"], pred["mos"], constant)
    conf = pred["probs"].max(-1)
    graded = len(conf) and not np.all(conf == 1.0)
    return out | {"confidence": float(conf.mean()) if graded else float("nan"),
                  "ece": calibration_error(pred["probs"], pred["label"]) if graded else float("nan")}  # fmt: skip


def eval_line(step: int, split: str, val: dict) -> str:
    """One console line per evaluation (the EMA teacher's when evaluated), the constant guess beside the MAE."""
    w = "ema" if f"{split}/ema/srcc" in val else "student"
    m = {k.rsplit("/", 1)[1]: v for k, v in val.items() if k.startswith(f"{split}/{w}/")}
    return (
        f"[sslfw] step {step} {split} ({w}): srcc {m['srcc']:.3f}  mae {m['mae']:.3f} "
        f"(constant guess {m['const_mae']:.3f})  accuracy {m['accuracy']:.3f}"
    )
