"""Dispatch for `sslfw bench`: builds the config, runs the chosen benchmarks, prints and saves their tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from sslfw.bench import Table, save
from sslfw.dist import is_main_process
from sslfw.errors import ConfigError
from sslfw.runconfig import load_config

ALL = ("data", "augment", "step", "speedups", "pseudolabel")


def run_bench(a: argparse.Namespace) -> dict:
    if a.what == "usb":  # in USB's own environment (sslfw/bench/usb.py)
        from sslfw.bench.usb import run_usb_bench

        return run_usb_bench(a, Path(__file__).resolve().parents[2])
    if a.what == "compare":  # bench.json folders of two code versions (launch/bench_before_after.sh)
        from sslfw.bench.compare import compare

        if not (a.before and a.after):
            raise ConfigError("sslfw bench compare: give --before DIR[,DIR...] and --after DIR[,DIR...]")
        return _report(compare([Path(d) for d in a.before.split(",")], [Path(d) for d in a.after.split(",")]), a, {})
    cfg = load_config(a.config, a.overrides)
    shards = str(a.shards or cfg.data.shards)
    todo = ALL if a.what == "all" else tuple(a.what.split(","))
    unknown = set(todo) - set(ALL)
    if unknown:
        raise ConfigError(f"sslfw bench: unknown benchmark(s) {sorted(unknown)}; choose from {ALL} or all")
    tables: list[Table] = []
    for what in todo:
        if what == "data":
            from sslfw.bench.data import bench_data

            t = bench_data(
                shards,
                cfg.data.load_crop,
                a.batch or cfg.train.batch_size,
                a.batches,
                [int(w) for w in a.workers.split(",")],
                a.reps,
                a.set,
            )
        elif what == "augment":
            from sslfw.bench.compute import bench_augment

            t = bench_augment(cfg, shards, a.steps, a.reps)
        elif what == "step":
            from sslfw.bench.compute import bench_step

            t = bench_step(cfg, shards, a.algorithms.split(","), a.steps, a.reps)
        elif what == "speedups":
            from sslfw.bench.compute import bench_speedups

            t = bench_speedups(cfg, shards, a.steps, a.reps, a.compile)
        else:
            from sslfw.bench.infer import bench_pseudolabel

            t = bench_pseudolabel(
                cfg, shards, a.batch or cfg.data.eval_batch_size, cfg.data.num_workers, a.chunk, a.limit, a.reps
            )
        tables.append(t)
    return _report(tables, a, {"config": str(a.config), "overrides": a.overrides, "shards": shards})


def _report(tables: list[Table], a: argparse.Namespace, meta: dict) -> dict:
    if is_main_process():
        for t in tables:
            print(t.markdown() + "\n", flush=True)
        if a.out:
            save(Path(a.out), tables, meta)
    return {"tables": [t.title for t in tables], "out": str(a.out) if a.out else None}
