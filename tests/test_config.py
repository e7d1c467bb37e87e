"""Config tree: YAML + dotted overrides, validated with errors that name the key."""

from __future__ import annotations

import pytest

from sslfw.config import ConfigError, load_config, save_config
from sslfw.metrics import constant_guess, iqa_metrics
import numpy as np


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 50\n  batch_size: 16\nmodel:\n  kwargs: {depth: 2}\n")
    cfg = load_config(f, ["--train.steps=70", "--optim.lr", "1e-4", "--model.kwargs.patch_size=8"])
    assert cfg.train.steps == 70 and cfg.train.batch_size == 16 and cfg.optim.lr == 1e-4
    assert cfg.model.kwargs == {"depth": 2, "patch_size": 8}
    assert load_config(f, ["--model.kwargs=null"]).model.kwargs == {}
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("--train.stepz=3", "unknown config key 'train.stepz'"),
    ("--train.steps=ten", "train.steps: expected int, got 'ten'"),
    ("--aug.strong=autoaugment", "aug.strong: 'autoaugment' is not one of"),
    ("--model.img_size=512", "model.img_size (512) must not exceed data.load_crop"),
    ("--train=3", "train: expected a section"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


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
