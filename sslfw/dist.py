"""Small collectives the loop needs; each is a no-op on a single process."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
from accelerate import Accelerator

from sslfw.errors import ConfigError


def precision_for(precision: str = "auto") -> str:
    """The mixed precision a process runs with. `auto`: accelerate's own choice when a launcher made one (`accelerate
    launch --mixed_precision`, or its config file, arrive as ACCELERATE_MIXED_PRECISION), else bf16 on a GPU that
    has it, fp16 on one that does not (V100, T4), none on a CPU. Any other value is the config's, and wins."""
    if precision != "auto":
        return precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _init_after_restart() -> None:
    """A launcher restart (torchrun/accelerate --max-restarts) starts every rank again against the agent's TCP store,
    which torch keeps across rendezvous rounds with the keys of the attempt before: a restarted rank could read a
    dead rank's gloo address or a stale barrier count and fail or hang, depending on who writes first. So after a
    restart the ranks meet on a prefix of that store named after the attempt; accelerate then uses this group."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if attempt == "0" or world < 2 or dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"/sslfw/attempt_{attempt}", agent),
        rank=int(os.environ["RANK"]),
        world_size=world,
    )


def make_accelerator(precision: str = "auto") -> Accelerator:
    """cpu=True on a GPU-less host, or `accelerate launch` starts N unconnected processes (docs/NOTES.md,
    Distributed training). Accelerate keeps one state per process: a later stage (eval after training in a
    pipeline) runs with the precision the process started with."""
    from accelerate.state import AcceleratorState

    chosen = AcceleratorState().mixed_precision if AcceleratorState._shared_state else precision_for(precision)
    if chosen == "fp16" and not torch.cuda.is_available():
        # accelerate neither autocasts nor scales fp16 on a CPU: say so, and record the precision that really runs.
        if is_main_process():
            print("[sslfw] fp16 needs a GPU (accelerate has no CPU fp16 autocast): running in fp32", file=sys.stderr)
        chosen = "no"
    _init_after_restart()
    try:
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=chosen)
    except ValueError as e:
        raise ConfigError(f"train.precision: {chosen!r} cannot run here ({e})") from None


def autocast_for(acc: Accelerator) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts in the accelerator's precision (fp16 steps also go through its gradient
    scaler, in `accelerator.backward`); a no-op without mixed precision. One rule for training, evaluation,
    pseudo-labelling and benchmarks."""
    return acc.autocast if acc.mixed_precision != "no" else nullcontext


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


SYNC = {"on": False, "seconds": 0.0}  # time in the algorithms' collectives; `sslfw bench step` reads it


@contextmanager
def timed_sync() -> Iterator[None]:
    """Counts the wall time of a bank/statistics collective into SYNC while SYNC["on"] (benchmarks only). Ranks
    first meet at an untimed barrier: waiting for a slower rank is not the collective's cost (without it, the
    ranks would wait as long at DDP's gradient all-reduce)."""
    if not SYNC["on"]:
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if is_dist():
        dist.barrier()
    t0 = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    SYNC["seconds"] += time.perf_counter() - t0


def is_main_process() -> bool:
    """Global rank 0; also right before any process group exists (a pipeline whose stages were all done)."""
    return dist.get_rank() == 0 if is_dist() else os.environ.get("RANK", "0") == "0"


def any_across_ranks(flags: list[bool | torch.Tensor], device: torch.device) -> list[bool]:
    """Element-wise OR over ranks: every rank reaches the same decision (skip, stop) at the same step. Flags may be
    device tensors: the one read-back to the host is the final list."""
    t = torch.stack([torch.as_tensor(f, device=device).float() for f in flags])
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean_across_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Global means of per-rank scalars (equal per-rank batches make this the global-batch mean)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], device=device).double() for k in keys])  # one read-back below
    if is_dist():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj: object) -> list:
    """All ranks' `obj`, in rank order (for variable-length evaluation outputs)."""
    if not is_dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks in rank order (no gradient)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    with timed_sync():
        dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank_offset(n: int) -> int:
    """Where this rank's n rows start in a rank-ordered gather of equal-sized batches."""
    return dist.get_rank() * n if is_dist() else 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.n = len(t)
        return all_gather_cat(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        with timed_sync():
            dist.all_reduce(grad)  # all_reduce works on every backend (gloo has no reduce_scatter)
        r = dist.get_rank()
        return grad[r * ctx.n : (r + 1) * ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Rank-ordered concatenation that back-propagates into every rank's own part (for global contrastive
    losses). Each rank's loss should be its local-row mean: DDP's average then equals the one-process gradient."""
    return _GatherWithGrad.apply(t) if is_dist() else t
