"""IQA metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslfw.errors import DataError
from sslfw.metrics import constant_guess, iqa_metrics, quadratic_weighted_kappa


def test_metrics_on_a_hand_computed_case():
    true = np.array([0, 2, 2, 3, 4, 4])
    pred = np.array([1, 2, 2, 2, 4, 2])
    score = np.array([0.8, 2.0, 2.1, 2.4, 3.9, 2.2])
    mos = np.array([1.5, 3.0, 3.1, 3.6, 4.2, np.nan])
    m = iqa_metrics(true, pred, score, mos, constant=2)
    assert m["mae"] == pytest.approx((1 + 0 + 0 + 1 + 0 + 2) / 6)
    assert m["const_mae"] == pytest.approx((2 + 0 + 0 + 1 + 2 + 2) / 6)
    assert m["mae_class4"] == pytest.approx(1.0) and m["mae_class34"] == pytest.approx(1.0)
    assert m["macro_mae"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["srcc"] == pytest.approx(1.0)  # the 5 rows with a MOS are ranked perfectly
    assert constant_guess([2, 13, 49, 33, 2]) == 2 and constant_guess([60, 10, 10, 10, 10]) == 0


def test_qwk_on_a_hand_computed_case():
    y = np.array([0, 1, 2, 2])
    p = np.array([0, 2, 2, 1])
    # observed disagreements (1,2) and (2,1) weigh 1/16 each; expected from the marginals
    observed = 2 / 16
    marg_y, marg_p = np.array([1, 1, 2, 0, 0]), np.array([1, 1, 2, 0, 0])
    w = (np.arange(5)[:, None] - np.arange(5)) ** 2 / 16
    expected = (w * np.outer(marg_y, marg_p) / 4).sum()
    assert quadratic_weighted_kappa(y, p) == pytest.approx(1 - observed / expected)
    assert quadratic_weighted_kappa(y, y) == pytest.approx(1.0)


def test_calibration_error_by_hand():
    from sslfw.metrics import calibration_error

    probs = np.array([[0.9, 0.1, 0, 0, 0], [0.9, 0.1, 0, 0, 0], [0.2, 0.6, 0.2, 0, 0], [0.2, 0.6, 0.2, 0, 0]])
    # bin 0.9: confidence 0.9, accuracy 1/2; bin 0.6: confidence 0.6, accuracy 1; each half of the samples
    assert calibration_error(probs, np.array([0, 1, 1, 1])) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert calibration_error(np.eye(5)[[0, 1, 2]], np.array([0, 1, 2])) == pytest.approx(0.0)


def test_pseudo_label_trace_accuracy_per_bin_matches_hand_counts(tmp_path):
    from sslfw import trace

    data = {"fingerprint": "f0", "split_sha256": "s0", "label_edges": [1, 2, 3, 4]}
    t = trace.PseudoTrace(tmp_path, rank=0, start=0, data=data)
    t.add(1, ["a", "b"], torch.tensor([2, 3]), torch.tensor([1.0, 0.0]))
    t.add(2, ["c", "d"], torch.tensor([1, 1]), torch.tensor([1.0, 1.0]))
    t.flush(2)
    t.add(3, ["a", "x"], torch.tensor([4, 0]), torch.tensor([0.0, 1.0]))  # "x" has no truth: left out
    t.flush(3)
    truth = {"a": 2, "b": 3, "c": 1, "d": 0}
    s = trace.accuracy_series(tmp_path, data, truth, bin_steps=2, min_used=1)
    # bin 1 (steps 1-2): used a(right) c(right) d(wrong) -> 2/3; all 3/4 right; 3 of 4 used
    # bin 2 (step 3): only "a", label 4 vs 2, not used -> used_acc NaN, all_acc 0, mask 0
    assert s["step"].tolist() == [2.0, 4.0]
    np.testing.assert_allclose(s["used_acc"], [2 / 3, np.nan])
    np.testing.assert_allclose(s["all_acc"], [3 / 4, 0.0])
    np.testing.assert_allclose(s["mask"], [3 / 4, 0.0])
    assert s["used"].tolist() == [3.0, 0.0]
    assert s["overall_used_acc"] == 2 / 3  # the report's used_acc: every step's used labels with a truth entry
    assert np.isnan(trace.accuracy_series(tmp_path, data, truth, bin_steps=2, min_used=4)["used_acc"][0])  # 3 < 4
    assert trace.PseudoTrace(tmp_path, 0, start=2, data=data) and trace.load(tmp_path, data)["step"].max() == 2
    # A trace read against another pack (keys there name other images) is refused, naming what differs.
    with pytest.raises(DataError, match=r"r0-upto-0000002.npz: this trace was made on other shards.*fingerprint"):
        trace.load(tmp_path, {**data, "fingerprint": "f1"})


def test_one_table_of_metrics_gives_w_and_b_the_best_not_the_last():
    from sslfw.metrics import METRICS, best_summaries

    best = best_summaries(["val/ema", "val/student"])
    assert best["val/ema/srcc"] == best["val/student/qwk"] == "max"
    assert best["val/ema/mae"] == best["val/ema/mae_class34"] == "min"
    assert len(best) == 2 * len(METRICS) and METRICS[0].name == "srcc"  # SRCC first in every report


def test_more_than_six_methods_get_one_learning_curve_panel_each(tmp_path):
    import json

    from sslfw.commands.report import learning_curves

    names = ["supervised-s0"] + [f"algo{i}-iqa_safe-s0" for i in range(7)]
    for i, name in enumerate(names):
        (tmp_path / name / "ssl").mkdir(parents=True)
        rows = [{"step": s, "val/ema/srcc": 0.5 + 0.01 * i + 0.001 * s, "val/ema/mae": 0.4} for s in (10, 20)]
        (tmp_path / name / "ssl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = learning_curves(tmp_path, set(names), {"features + ridge": {"srcc": 0.6}})
    assert drawn == {"supervised": 1} | {f"algo{i}-iqa_safe": 1 for i in range(7)}
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
