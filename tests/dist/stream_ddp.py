"""Run by tests under torchrun (2 gloo processes): training and eval streams over real shards, real collectives.

Writes {out}/rank{R}.json with what this rank saw; the test compares ranks.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sslfw.data.reader import ShardSet
from sslfw.data.stream import EvalStream, TrainStream, make_loader


def main(shards: str, out: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"rank": rank}

    train = ShardSet(shards, "train")
    loader = make_loader(TrainStream(train, batch_size=8, crop=(32, 32), seed=0, rank=rank), num_workers=2)
    seen = []
    for step, batch in zip(range(steps), loader):
        # A collective every step: a rank that ran out early would hang here instead of finishing.
        total = torch.tensor([batch["image"].shape[0]])
        dist.all_reduce(total)
        assert int(batch["step"]) == step
        seen.append(batch["idx"].tolist())
    result |= {"train_steps": len(seen), "train_idx": seen, "train_shards": len(train.shards)}

    for name in ("train", "val"):
        shards_set = ShardSet(shards, name)
        idx, batches = [], 0
        for batch in make_loader(EvalStream(shards_set, 4, (32, 32), rank, world), num_workers=2):
            idx += batch["idx"].tolist()  # no collective inside a finite loop: ranks may differ in length
            batches += 1
        gathered = [None] * world
        dist.all_gather_object(gathered, idx)
        result[name] = {"idx": idx, "all": sum(gathered, []), "size": len(shards_set),
                        "shards": len(shards_set.shards), "batches": batches}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
