"""A training run opened on a claimed run folder: its inputs read before anything is written, its parts built, and
the named calls the loop in sslfw/train.py makes (batches, log, evaluate, save, stop, close)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from sslfw import ckpt, fsio, rundir
from sslfw.algorithms.base import DataInfo, StepBatch
from sslfw.config import Config, save_config, to_dict
from sslfw.data.jpeg import join_deferred
from sslfw.data.pseudo import load_pseudo_labels
from sslfw.data.reader import ShardSet
from sslfw.data.shards import identity, identity_mismatch, load_index
from sslfw.data.stream import StreamId, TrainStream, make_loader
from sslfw.dist import barrier, mean_across_ranks
from sslfw.errors import ConfigError, DataError
from sslfw.evaluate import Evaluator, eval_line
from sslfw.logger import RunLogger
from sslfw.metrics import best_summaries, constant_guess
from sslfw.optim import lr_factor
from sslfw.preempt import StopFlag, record, write_exit_file
from sslfw.step import Run, StepResult, build_run, make_batch, seed_of
from sslfw.trace import PseudoTrace

PREEMPTED = "preempted.json"  # written with EXIT_PREEMPTED: {"step", "signal"}; removed when the run restarts


@dataclass
class Streams:
    """Per-rank infinite loaders; batch s of each is a pure function of (seed, stream, rank, s)."""

    labelled: Iterator[dict]
    unlabelled: Iterator[dict] | None
    pseudo: Iterator[dict] | None  # confident pseudo-labels drawn with the labelled batch (retraining)
    n_pseudo: int  # of the per-rank labelled batch
    damaged: int = 0  # images skipped on this rank because they no longer decode (replaced within their batch)

    def _next(self, it: Iterator[dict]) -> dict:
        batch = next(it)
        self.damaged += int(batch["damaged"])
        return batch

    def next_labelled(self) -> dict:
        lb = self._next(self.labelled)
        if self.pseudo is not None:
            pl = self._next(self.pseudo)
            joined = {k: torch.cat([lb[k], pl[k]]) for k in ("image", "label", "idx", "target")}
            lb = joined | {"key": lb["key"] + pl["key"]} | join_deferred(lb, pl)
        return lb

    def next_unlabelled(self) -> dict | None:
        return self._next(self.unlabelled) if self.unlabelled is not None else None


def open_streams(
    cfg: Config, lb_set: ShardSet, per_rank: int, rank: int, start: int, cuda: bool, uses_unlabelled: bool
) -> Streams:
    """The streams a run reads, positioned at optimizer step `start`."""
    crop, seed, pos = (cfg.data.load_crop, cfg.data.load_crop), cfg.train.seed, start * cfg.train.grad_accum

    def loader(shards: ShardSet, batch: int, stream: StreamId, **kw) -> Iterator[dict]:
        ts = TrainStream(shards, batch, crop, seed, rank, stream, pos, **kw)
        return iter(make_loader(ts, cfg.data.num_workers, pin_memory=cuda))

    pseudo, n_pl = None, 0
    if cfg.data.pseudo_labels:  # the paper's retraining: labelled and pseudo-labelled images drawn as one union
        if uses_unlabelled or per_rank < 2:
            raise ConfigError(
                "data.pseudo_labels: retraining on pseudo-labels is supervised, with at least 2 "
                "images per rank; set algorithm.name=supervised and a larger train.batch_size"
            )
        pool = ShardSet(cfg.data.shards, "unlabelled", cfg.data.jpeg_on_device)
        labels, keep = load_pseudo_labels(Path(cfg.data.pseudo_labels), pool, cfg.data.pseudo_min_confidence)
        share = cfg.data.pseudo_share or keep.sum() / (keep.sum() + len(lb_set))
        n_pl = min(per_rank - 1, max(1, round(per_rank * share)))
        pseudo = loader(pool, n_pl, StreamId.PSEUDO_LABELLED, keep=keep, labels=labels)
    unlabelled = None
    if uses_unlabelled:
        pool = ShardSet(cfg.data.shards, "unlabelled", cfg.data.jpeg_on_device)
        unlabelled = loader(pool, per_rank * cfg.algorithm.uratio, StreamId.UNLABELLED)
    return Streams(loader(lb_set, per_rank - n_pl, StreamId.LABELLED), unlabelled, pseudo, n_pl)


@dataclass
class NonFinite:
    """Counts steps skipped for a non-finite loss; `limit` in a row stops the run (the last checkpoint is intact)."""

    limit: int
    skipped: int  # in this run's whole history (a resumed run continues the count)
    main: bool
    in_a_row: int = 0

    def stop_after(self, step: int, applied: bool) -> bool:
        if applied:
            self.in_a_row = 0
            return False
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        if self.main:
            print(f"[sslfw] step {step}: non-finite loss on some rank; step skipped ({self.in_a_row} in a row, "
                  f"{self.skipped} total)", flush=True)  # fmt: skip
        if self.in_a_row < self.limit:
            return False
        if self.main:
            print(f"[sslfw] stopping: {self.in_a_row} non-finite steps in a row (train.max_nonfinite). Lower optim.lr "
                  f"or check the data; the last checkpoint is intact.", file=sys.stderr)  # fmt: skip
        return True


@dataclass
class Session:
    """Everything the loop touches between two steps, opened at step `start`."""

    cfg: Config
    acc: Accelerator
    run: Run
    streams: Streams
    evaluator: Evaluator
    logger: RunLogger
    trace: PseudoTrace
    start: int
    nonfinite: NonFinite
    t_last: float = field(default_factory=time.perf_counter)

    def announce(self, per_rank: int) -> None:
        cfg, acc, n_pl = self.cfg, self.acc, self.streams.n_pseudo
        ur = cfg.algorithm.uratio if self.streams.unlabelled is not None else 0
        if acc.is_main_process:
            print(f"[sslfw] {acc.num_processes} process(es) on {acc.device}: global batch {cfg.train.batch_size} = "
                  f"{acc.num_processes} ranks x {per_rank} x {cfg.train.grad_accum} accumulation ({n_pl} of {per_rank} "
                  f"pseudo-labelled); unlabelled x{ur}; steps "
                  f"{self.start}->{cfg.train.steps}; algorithm {cfg.algorithm.name}; run_dir {cfg.run_dir}",
                  flush=True)  # fmt: skip

    def batches(self, step: int) -> Iterator[StepBatch]:
        """The step's micro-batches. The global RNG (drop path) and the augmentation generator are reseeded from
        (seed, rank, step), so a resumed run repeats the uninterrupted one."""
        seed, rank, device = self.cfg.train.seed, self.acc.process_index, self.acc.device
        torch.manual_seed(seed_of(seed, rank, step))
        gen = torch.Generator(device).manual_seed(seed_of(seed, rank, step, 1))
        s = self.streams
        return (
            make_batch(self.run, s.next_labelled(), s.next_unlabelled(), gen) for _ in range(self.cfg.train.grad_accum)
        )

    def record_pseudo(self, step: int, res: StepResult) -> None:
        for keys, level, used in res.pseudo if self.cfg.log.pseudo_trace else ():
            self.trace.add(step, keys, level, used)

    def log_train(self, step: int, res: StepResult) -> float:
        """The step's losses averaged over ranks, with lr, skips and speed; returns the loss for the progress bar."""
        logs = mean_across_ranks({**res.logs, "loss": res.loss if res.applied else float("nan")}, self.acc.device)
        now = time.perf_counter()
        logs |= {"lr": res.lr, "skipped_steps": self.nonfinite.skipped,
                 "steps_per_s": self.cfg.train.log_every / (now - self.t_last)}  # fmt: skip
        if self.streams.damaged:
            logs["damaged_images"] = self.streams.damaged  # this process's count since its start
        self.t_last = now
        self.logger.log(step, {f"train/{k}": v for k, v in logs.items()})
        return logs["loss"]

    def evaluate(self, step: int) -> dict:
        """The eval split's metrics of the student and/or EMA teacher (eval.weights), logged and printed."""
        which = ("student", "ema") if self.cfg.eval.weights == "both" else (self.cfg.eval.weights,)
        models = {"student": self.run.raw_model, "ema": self.run.ema.module if self.run.ema else None}
        val = self.evaluator.metrics({name: models[name] for name in which})
        self.trace.flush(step)
        self.logger.log(step, val)
        if self.acc.is_main_process and val:
            tqdm.write(eval_line(step, self.cfg.eval.split, val), file=sys.stdout)  # above the bar, not into it
        return val

    def save(self, step: int, val_now: dict | None) -> None:
        self.trace.flush(step)
        self.run.checkpointer.save(step, self.nonfinite.skipped, val_now)

    def stop(self, step: int, flag: StopFlag, val_now: dict | None) -> int:
        """A stop signal reached some rank: save this step and leave the reason in the run folder."""
        self.save(step, val_now)
        exit_code = flag.exit_code  # 130 for Ctrl-C, else 75 (Slurm requeues on it)
        if self.acc.is_main_process:  # launchers hide worker exit codes, so the reason is also left in the run dir
            fsio.write_json(Path(self.cfg.run_dir) / PREEMPTED, {"step": step, "signal": flag.signal})
            write_exit_file(exit_code)
            print(f"[sslfw] {flag.signal or 'stop signal'} on some rank: saved step-{step}, exiting with {exit_code} "
                  f"(resume with --ckpt.resume auto)", flush=True)  # fmt: skip
        barrier()  # the code is on disk before any rank exits: srun may end the step at the first non-zero exit
        return exit_code

    def close(self, step: int, exit_code: int, val: dict) -> dict:
        if self.acc.is_main_process:
            record(Path(self.cfg.run_dir), "end", step, exit_code=exit_code)
        self.logger.close()  # the process group stays: a pipeline runs more stages in it; the CLI destroys it at exit
        return {"exit_code": exit_code, "step": step, "skipped_steps": self.nonfinite.skipped, "val": val,
                "run_dir": str(self.cfg.run_dir)}  # fmt: skip


def open_session(cfg: Config, acc: Accelerator, per_rank: int, saved: ckpt.Saved | None, created: bool) -> Session:
    """Read the inputs and build the run; only then write (config, owner, start record). A start its inputs refuse
    writes nothing and leaves no folder it created."""
    main, run_dir, start = acc.is_main_process, Path(cfg.run_dir), saved.step if saved else 0
    try:
        index = load_index(Path(cfg.data.shards))
        data_id = identity(index)
        if cfg.data.pseudo_labels and Path(cfg.data.pseudo_labels).is_file():  # resumes only on the same labels
            data_id["pseudo_labels_sha256"] = fsio.sha256_file(cfg.data.pseudo_labels)
        if saved and saved.info.get("data") and (diff := identity_mismatch(saved.info["data"], data_id)):
            raise DataError(
                f"{cfg.data.shards}: is not the data {saved.path} was trained on ({diff}); resume with the shards "
                f"it trained on, or start another run_dir"
            )
        jpeg = cfg.data.jpeg_on_device
        lb_set, eval_set = ShardSet(cfg.data.shards, "train", jpeg), ShardSet(cfg.data.shards, cfg.eval.split, jpeg)
        if len(eval_set) == 0:
            raise DataError(f"{cfg.data.shards}: eval.split {cfg.eval.split!r} has no samples; choose another split")
        n_pool = index["sets"].get("unlabelled", {}).get("count", 0)
        data = DataInfo(len(lb_set), n_pool, cfg.model.proj_dim, tuple(index["label_scheme"]["edges"]))
        run = build_run(cfg, acc, data, saved.state if saved else None)
        run.checkpointer.info["data"] = data_id
        cuda, uses_pool = acc.device.type == "cuda", run.algorithm.uses_unlabelled
        streams = open_streams(cfg, lb_set, per_rank, acc.process_index, start, cuda, uses_pool)
    except Exception:
        if main and created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if main and saved and (before := saved.config.get("train", {}).get("steps", cfg.train.steps)) != cfg.train.steps:
        # The schedule is a function of (step, train.steps): a new total re-stretches the cosine from here on.
        old, new = (cfg.optim.lr * lr_factor(start, n, cfg.optim) for n in (before, cfg.train.steps))
        print(f"[sslfw] train.steps {before} -> {cfg.train.steps}: the cosine schedule now ends at step "
              f"{cfg.train.steps}, so the lr at step {start} is {new:.3g} (it was {old:.3g} on the old schedule)",
              flush=True)  # fmt: skip
    if main:
        save_config(cfg, run_dir / "config.yaml")
        rundir.write_owner(run_dir, to_dict(cfg))
        (run_dir / PREEMPTED).unlink(missing_ok=True)
        record(run_dir, "start", start, world_size=acc.num_processes)
    constant = constant_guess(index["sets"]["train"]["class_counts"])
    evaluator = Evaluator(eval_set, cfg.model.img_size, cfg.data.eval_batch_size, cfg.data.num_workers, acc,
                          run.autocast, constant)  # fmt: skip
    which = ("student", "ema") if cfg.eval.weights == "both" else (cfg.eval.weights,)
    summaries = best_summaries([f"{cfg.eval.split}/{w}" for w in which])
    logger = RunLogger(run_dir, main, cfg.log, to_dict(cfg), start, summaries)
    trace = PseudoTrace(run_dir, acc.process_index, start, identity(index))
    nonfinite = NonFinite(cfg.train.max_nonfinite, saved.skipped_steps if saved else 0, main)
    return Session(cfg, acc, run, streams, evaluator, logger, trace, start, nonfinite)
