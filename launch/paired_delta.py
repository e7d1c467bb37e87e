"""Paired SRCC difference between any two pipeline rows (docs/RESULTS.md's controls): A minus B over the seeds
both have, 95% interval by bootstrap over the evaluated images. A and B are run folders with `{s}` for the seed:
    python launch/paired_delta.py 'runs/x/rankup_levels-iqa_safe-s{s}' 'runs/y/rankup_levels-iqa_safe-s{s}' 0,1,2
"""

import sys

import numpy as np

from sslfw.metrics import paired_bootstrap_srcc


def load(run: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(f"{run}/eval/predictions.npz") as z:
        return z["mos"], z["score"]


def main(a: str, b: str, seeds: str) -> None:
    ids = [int(s) for s in seeds.split(",")]
    runs_a, runs_b = ({s: load(p.format(s=s)) for s in ids} for p in (a, b))
    mos = runs_a[ids[0]][0]
    d, lo, hi = paired_bootstrap_srcc(mos, {s: runs_a[s][1] for s in ids}, {s: runs_b[s][1] for s in ids})
    print(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]{' *' if lo > 0 or hi < 0 else ''}  ({len(ids)} seeds, {len(mos)} images)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
