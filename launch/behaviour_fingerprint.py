"""What a refactor must not change: every registered algorithm's per-step losses and final weights, for fixed seeds.

Run it from two trees on the same shards and compare the JSON files (`--compare A B`):
    PYTHONPATH=$BEFORE python launch/behaviour_fingerprint.py --shards S --out before.json
    PYTHONPATH=$AFTER  python launch/behaviour_fingerprint.py --shards S --out after.json
    python launch/behaviour_fingerprint.py --compare before.json after.json
`--make-shards DIR` builds the small embedded shards the test suite uses (same generator, same seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

STEPS = 6


def weights_sha(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(shards: Path) -> dict:
    import torch

    from sslfw.algorithms import names
    from sslfw.train import train

    try:
        from sslfw.runconfig import load_config
    except ImportError:  # trees before the config was resolved in sslfw/runconfig.py
        from sslfw.config import load_config
    from tests.helpers import tiny_overrides

    out = {}
    for name in names():
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            over = {"algorithm.name": name, "train.steps": STEPS, "ckpt.every": STEPS, "eval.every": STEPS}
            res = train(load_config(None, tiny_overrides(shards, run, **over)))
            logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            state = torch.load(run / f"step-{STEPS}" / "state.pt", map_location="cpu", weights_only=True)
            out[name] = {
                "loss": [r["train/loss"] for r in logs if "train/loss" in r],
                "val_srcc": res["val"].get("val/ema/srcc", res["val"].get("val/student/srcc")),
                "model": weights_sha(state["model"]),
                "ema": weights_sha(state["ema"]["module"]) if state.get("ema") else None,
            }
        print(name, out[name]["model"][:12], out[name]["loss"][-1], flush=True)
    return out


def compare(a: Path, b: Path) -> int:
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for name in sorted(set(before) | set(after)):
        x, y = before.get(name), after.get(name)
        same = x == y
        bad += not same
        print(f"{name:22s} {'same' if same else 'DIFFERENT' if x and y else 'only in one'}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--make-shards", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path)
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
    if a.make_shards:
        from sslfw.data.shards import pack
        from tests.helpers import make_raw, prepare_raw

        raw = make_raw(a.make_shards / "raw")
        pack(prepare_raw(raw, a.make_shards / "manifest"), a.make_shards / "shards", 15, workers=1, progress=False)
        return 0
    a.out.write_text(json.dumps(fingerprint(a.shards), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
