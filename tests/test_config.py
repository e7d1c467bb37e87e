"""Config tree: YAML + dotted overrides, validated with errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from sslfw.config import load_config, save_config
from sslfw.errors import ConfigError
from tests.helpers import run_sslfw


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 50\n  batch_size: 16\nmodel:\n  kwargs: {depth: 2}\n")
    cfg = load_config(f, ["--train.steps=70", "--optim.lr", "1e-4", "--model.kwargs.patch_size=8"])
    assert cfg.train.steps == 70 and cfg.train.batch_size == 16 and cfg.optim.lr == 1e-4
    assert cfg.model.kwargs == {"depth": 2, "patch_size": 8}
    assert load_config(f, ["--model.kwargs=null"]).model.kwargs == {}
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.stepz=3", "unknown config key 'train.stepz'"),
        ("--train.steps=ten", "train.steps: expected int, got 'ten'"),
        ("--aug.strong=autoaugment", "aug.strong: 'autoaugment' is not one of"),
        ("--model.img_size=512", "model.img_size (512) must not exceed data.load_crop"),
        ("--train=3", "train: expected a section"),
        ("--algorithm.name=flexmatch", "algorithm.name: 'flexmatch' is not one of"),
        ("--algorithm.params.p_cutoff=0.7", "algorithm.params.p_cutoff: supervised has no such setting"),
        ("--algorithm.name=fixmatch --algorithm.params.p_cutoff=high", "algorithm.params.p_cutoff: expected float"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert message in str(e.value)


def test_algorithm_params_are_resolved_with_every_default_and_saved(tmp_path):
    cfg = load_config(None, ["--algorithm.name=fixmatch", "--algorithm.params.p_cutoff=0.7"])
    assert cfg.algorithm.params == {"p_cutoff": 0.7, "hard_label": True, "T": 0.5, "usb_compat": False}
    save_config(cfg, tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert saved["algorithm"]["params"] == cfg.algorithm.params  # the defaults in force are on record
    assert load_config(tmp_path / "c.yaml") == cfg


def test_a_misspelt_algorithm_param_exits_2_before_any_data_is_read(tmp_path):
    run = tmp_path / "run"
    proc = run_sslfw(
        [
            "train",
            f"--run_dir={run}",
            f"--data.shards={tmp_path / 'no_such_shards'}",
            "--algorithm.name=fixmatch",
            "--algorithm.params.p_cutof=0.7",
        ]
    )
    assert proc.returncode == 2
    assert (
        "algorithm.params.p_cutof: fixmatch has no such setting; known: ['T', 'hard_label', 'p_cutoff'" in proc.stderr
    )
    assert "no_such_shards" not in proc.stderr and not run.exists()
