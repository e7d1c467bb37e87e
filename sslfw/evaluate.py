"""Sharded evaluation: each rank predicts its slice of the set, predictions are gathered, metrics computed.

No rank evaluates everything, and the gathered indices are checked to cover the set exactly once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sslfw.data.stream import EvalStream, ShardSet, make_loader
from sslfw.dist import gather_objects
from sslfw.metrics import iqa_metrics
from sslfw.model import expected_score


@torch.no_grad()
def predict(model: nn.Module, shards: ShardSet, img_size: int, batch_size: int, num_workers: int, rank: int,
            world: int, device: torch.device, autocast) -> dict[str, np.ndarray]:
    """Centre-crop predictions for the whole set, gathered from all ranks and sorted by sample index."""
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"idx": [], "label": [], "mos": [], "logits": []}
    stream = EvalStream(shards, batch_size, (img_size, img_size), rank, world)
    for batch in make_loader(stream, num_workers):
        with autocast():
            logits = model(batch["image"].to(device).float() / 255)["logits"]
        parts["logits"].append(logits.float().cpu().numpy())
        for k in ("idx", "label", "mos"):
            parts[k].append(batch[k].numpy())
    model.train(was_training)
    local = {k: np.concatenate(v) if v else np.zeros((0, 5) if k == "logits" else 0) for k, v in parts.items()}
    ranks = gather_objects(local)
    out = {k: np.concatenate([r[k] for r in ranks]) for k in local}
    order = np.argsort(out["idx"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if not np.array_equal(out["idx"], np.arange(len(shards))):
        raise RuntimeError(f"evaluation of {shards.name} covered {len(np.unique(out['idx']))} distinct of "
                           f"{len(shards)} samples with {len(out['idx'])} predictions: the split is broken")
    return out


def metrics_from_predictions(pred: dict[str, np.ndarray], constant: int) -> dict:
    logits = torch.from_numpy(pred["logits"])
    return iqa_metrics(pred["label"], logits.argmax(-1).numpy(), expected_score(logits).numpy(), pred["mos"],
                       constant)
