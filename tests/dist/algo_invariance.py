"""Run under torchrun with 1 or 2 gloo processes: each named algorithm's steps (comma-separated names: one launch
for all of them) on a fixed GLOBAL batch of 16, each rank taking its slice. Writes {out}/rank{R}-{name}.json:
global losses, gradients (averaged as DDP does) and state per step.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sslfw.algorithms import get_algorithm
from sslfw.algorithms.base import DataInfo, StepBatch, StepContext
from sslfw.config import AlgorithmConfig, AugConfig, ModelConfig
from sslfw.algorithms import resolve_params
from sslfw.model import IQAModel


def main(names: str, out: str, steps: int) -> None:
    dist.init_process_group("gloo")
    for name in names.split(","):
        run(name, out, steps)
    dist.destroy_process_group()


def run(name: str, out: str, steps: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cls = get_algorithm(name)
    model = IQAModel(ModelConfig(img_size=16, proj_dim=8, kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}),
                     cls.extra_heads, cls.projection, cls.score_head)
    params = {"adamatch": {"ema_p": 0.7, "p_cutoff": 0.7}, "freematch": {"ema_p": 0.7},
              "comatch": {"queue_size": 40, "da_len": 3, "p_cutoff": 0.2, "contrast_p_cutoff": 0.05},
              "simmatch": {"da_len": 3, "p_cutoff": 0.2}, "crmatch": {"p_cutoff": 0.22},
              "fixmatch": {"p_cutoff": 0.22}, "rankup": {"p_cutoff": 0.5005}, "rankup_rda": {"p_cutoff": 0.5005},
              "rankup_levels": {"p_cutoff": 0.5005}}.get(name, {})
    cfg = AlgorithmConfig(name=name, params=params)
    resolve_params(cfg)
    algo = cls(cfg, DataInfo(num_labelled=16, num_unlabelled=64, proj_dim=8))
    B = 16 // world
    rows = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        full = {"x_lb": torch.rand(16, 3, 16, 16, generator=g), "y_lb": torch.randint(0, 5, (16,), generator=g),
                "idx_lb": torch.randperm(16, generator=g) if step == 0 else torch.randint(0, 16, (16,), generator=g), "x_w": torch.rand(16, 3, 16, 16, generator=g),
                "x_s": [torch.rand(16, 3, 16, 16, generator=g) for _ in range(max(cls.views(AugConfig()).strong, 1))],
                "idx_ulb": torch.randperm(64, generator=g)[:16],
                "mos": torch.where(torch.arange(16) == 3, float("nan"), 1 + 4 * torch.rand(16, generator=g))}
        sl = slice(rank * B, (rank + 1) * B)
        batch = StepBatch(full["x_lb"][sl], full["y_lb"][sl], full["idx_lb"][sl], [full["x_w"][sl]],
                          [x[sl] for x in full["x_s"]], full["idx_ulb"][sl], mos_lb=full["mos"][sl])
        model.zero_grad()
        out_ = algo.step(model, batch, StepContext(step, 10, None))
        out_.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        loss = out_.loss.detach().clone()
        dist.all_reduce(grads)
        dist.all_reduce(loss)
        state = {k: v.tolist() for k, v in algo.state_dict().items()}
        digest = hashlib.sha256(json.dumps(state).encode()).hexdigest()
        logs = {k: float(v) for k, v in out_.logs.items()}
        rows.append({"loss": loss.item() / world, "logs": logs, "grads": (grads / world).tolist(), "state": state, "hash": digest})
    Path(out, f"rank{rank}-{name}.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
