"""MOS -> 5 ordinal quality levels (0 worst .. 4 best).

No simple rule reproduces the paper's class shares on KonIQ (about 2/13/49/33/2 %, docs/NOTES.md, Labels); the
default edges are the MOS quantiles of the official KonIQ-10k scores at those shares. The scheme is stored in every
manifest and shard index so a run can say which labels it learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

NUM_CLASSES = 5
# MOS (1..5 scale) edges between levels 0|1, 1|2, 2|3, 3|4, from KonIQ-10k's official csv.
DEFAULT_EDGES = (1.79, 2.55, 3.46, 3.94)
PAPER_SHARES = (0.02, 0.13, 0.49, 0.33, 0.02)


@dataclass(frozen=True)
class LabelScheme:
    edges: tuple[float, ...] = DEFAULT_EDGES

    def __post_init__(self) -> None:
        if len(self.edges) != NUM_CLASSES - 1 or any(a >= b for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"label edges must be {NUM_CLASSES - 1} increasing MOS values, got {self.edges}")

    def label(self, mos: float) -> int:
        """Level of one MOS: the number of edges it reaches (an edge value belongs to the upper level)."""
        return int(np.searchsorted(self.edges, mos, side="right"))

    def labels(self, mos: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges), np.asarray(mos), side="right").astype(np.int64)

    def vote_probs(self, votes: list[float] | None, label: int) -> np.ndarray:
        """P(level) of one image from its vote counts c1..c5: the chance that the MOS of an endless crowd falls in
        each level, with the crowd's mean as estimate and sd/sqrt(n) as its error. An image whose MOS sits at an
        edge is then half one level, half the next, as its label is. No votes: the label, one-hot."""
        if not votes or sum(votes) < 2:
            return np.eye(NUM_CLASSES)[label]
        c, v = np.asarray(votes, dtype=np.float64), np.arange(1, 6)
        n = c.sum()
        mos = (c * v).sum() / n
        se = max(np.sqrt((c * (v - mos) ** 2).sum() / (n - 1) / n), 1e-3)
        cdf = ndtr((np.asarray(self.edges) - mos) / se)
        return np.diff(np.concatenate([[0.0], cdf, [1.0]]))

    def to_dict(self) -> dict:
        return {"column": "MOS", "scale": [1.0, 5.0], "edges": list(self.edges), "num_classes": NUM_CLASSES}

    @classmethod
    def parse(cls, spec: str | None, mos: np.ndarray | None = None) -> LabelScheme:
        """`None` -> KonIQ default; "1.8,2.6,3.5,3.9" -> those edges; "quantile:2,13,49,33,2" -> edges that give
        those percentage shares on `mos` (the labelled MOS values being binned)."""
        if not spec:
            return cls()
        if spec.startswith("quantile:"):
            shares = np.array([float(s) for s in spec.split(":", 1)[1].split(",")])
            if len(shares) != NUM_CLASSES or mos is None or len(mos) == 0:
                raise ValueError(f"--bins {spec!r}: give {NUM_CLASSES} percentages and some labelled rows")
            cum = np.cumsum(shares / shares.sum())[:-1]
            return cls(tuple(float(e) for e in np.quantile(mos, cum)))
        try:
            return cls(tuple(float(e) for e in spec.split(",")))
        except ValueError as e:
            raise ValueError(f"--bins {spec!r}: {e}") from None
