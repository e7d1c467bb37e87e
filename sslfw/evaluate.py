"""Sharded prediction and evaluation: each rank predicts its slice, predictions are gathered, metrics computed.

No rank evaluates everything, and the gathered indices are checked to cover the set exactly once. Predictions are
class probabilities, averaged over crops when several native-resolution crops are asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from sslfw.data.jpeg import images_on
from sslfw.data.labels import NUM_CLASSES
from sslfw.data.reader import ShardSet
from sslfw.data.stream import EvalStream, make_loader
from sslfw.dist import gather_objects
from sslfw.metrics import calibration_error, iqa_metrics
from sslfw.model import expected_score


@torch.no_grad()
def predict_views(
    model: nn.Module, x: torch.Tensor, counts: torch.Tensor, device: torch.device, autocast, chunk: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities, continuous score) per image of views `x` (uint8, NCHW), `counts[i]` consecutive views
    belonging to image i, moved to `device` and made float `chunk` views at a time (0: all at once), so a huge
    photo's many views never exist as floats all together. The one prediction routine of eval,
    pseudo-labelling and predict. The score is the expected level for a classifier and the predicted MOS for a
    model with a score head, whose levels (one-hot `probs`) are that MOS read through the edges it was trained
    with."""
    with autocast():
        outs = [model(part.to(device).float() / 255) for part in (x.split(chunk) if chunk else (x,))]
    head = "mos" in outs[0]
    per_view = torch.cat([o["mos"].float()[:, None] if head else o["logits"].float().softmax(-1) for o in outs])
    counts = counts.to(device)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    per_image = torch.zeros(len(counts), per_view.shape[-1], device=device).index_add_(0, owner, per_view)
    per_image = per_image / counts[:, None]
    if head:
        score = per_image[:, 0]
        return nn.functional.one_hot(model.levels(score), NUM_CLASSES).float(), score
    return per_image, expected_score(per_image)


@torch.no_grad()
def predict_batch(model: nn.Module, batch: dict, device: torch.device, autocast) -> dict[str, np.ndarray]:
    """idx, label, mos, key, view-averaged class probabilities and the continuous score of one loader batch (model
    in eval mode): fixed crops per image, or whole-image tiles (`tiles`: how many per image)."""
    x = images_on(batch, device)
    if "tiles" in batch:
        counts = batch["tiles"]
    else:
        counts = torch.full((len(x),), x.shape[1] if x.ndim == 5 else 1, dtype=torch.long)
    probs, score = predict_views(model, x.flatten(0, 1) if x.ndim == 5 else x, counts, device, autocast)
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


@dataclass
class Evaluator:
    """One split, predicted in slices across ranks and gathered: the trainer's periodic evaluation and `sslfw eval`
    share it, so both read the same images the same way."""

    shards: ShardSet
    img_size: int
    batch_size: int
    num_workers: int
    acc: Accelerator
    autocast: Callable[[], AbstractContextManager]
    constant: int  # the constant guess's level (the median training level), for const_mae
    crops: int = 1

    def predict(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Predictions for the whole set, sorted by sample index, checked to cover it exactly once."""
        acc = self.acc
        size = (self.img_size, self.img_size)
        stream = EvalStream(self.shards, self.batch_size, size, acc.process_index, acc.num_processes, crops=self.crops)
        ranks = gather_objects(predict_stream(model, stream, self.num_workers, acc.device, self.autocast))
        out = {k: np.concatenate([r[k] for r in ranks]) for k in ranks[0]}
        order = np.argsort(out["idx"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
        if not np.array_equal(out["idx"], np.arange(len(self.shards))):
            raise RuntimeError(
                f"evaluation of {self.shards.name} covered {len(np.unique(out['idx']))} distinct of "
                f"{len(self.shards)} samples with {len(out['idx'])} predictions: the split is broken"
            )
        return out

    def metrics(self, models: dict[str, nn.Module | None]) -> dict:
        """{"SPLIT/NAME/metric": value} for each named model that exists (the EMA teacher may not)."""
        out = {}
        for name, model in models.items():
            if model is not None:
                metrics = metrics_from_predictions(self.predict(model), self.constant)
                out |= {f"{self.shards.name}/{name}/{k}": v for k, v in metrics.items()}
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
