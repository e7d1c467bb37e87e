"""Config tree: YAML + dotted overrides, validated with errors that name the key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from sslfw.config import parse_config, save_config
from sslfw.errors import ConfigError
from sslfw.runconfig import load_config
from tests.helpers import ROOT, child_env, run_sslfw


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


@pytest.mark.slow  # a real CLI process or a full-size synth: seconds
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
        "algorithm.params.p_cutof: fixmatch has no such setting; did you mean 'p_cutoff'? known: ['T', 'hard_label'"
        in proc.stderr
    )
    assert "no_such_shards" not in proc.stderr and not run.exists()


def test_flags_take_dashes_or_underscores_and_a_bare_key_means_true():
    cfg = load_config(None, ["--ckpt.overwrite", "--train.batch-size=8"])
    assert cfg.ckpt.overwrite is True and cfg.train.batch_size == 8
    cfg = load_config(None, ["--log.progress", "--train.steps", "7"])  # a bare key followed by another key
    assert cfg.log.progress is True and cfg.train.steps == 7
    with pytest.raises(ConfigError, match="train.steps: expected int"):  # a bare non-boolean names the key
        load_config(None, ["--train.steps"])


@pytest.mark.slow  # a real CLI process or a full-size synth: seconds
def test_help_lists_every_key_with_its_default_and_config_show_resolves(tmp_path):
    """`sslfw train --help` names every key (algorithm settings with each algorithm's default); `sslfw config show`
    prints the tree a run would save; `--version` and `--help` do not import torch; verb flags take underscores."""
    helped = run_sslfw(["train", "--help"])
    assert helped.returncode == 0
    assert "--optim.lr=VALUE  (float, default 0.0005)" in helped.stdout
    assert "--algorithm.params.p_cutoff=VALUE  (float; default per algorithm: " in helped.stdout
    assert "fixmatch 0.95" in helped.stdout and "--algorithm.params.warm_start" in helped.stdout
    shown = run_sslfw(["config", "show", "--algorithm.name=fixmatch", "--algorithm.params.p-cutoff=0.7"])
    tree = yaml.safe_load(shown.stdout)
    assert tree["algorithm"]["params"]["p_cutoff"] == 0.7 and tree["algorithm"]["params"]["hard_label"] is True
    probe = "import sys; from sslfw.cli import main; main(sys.argv[1:]); print('torch' in sys.modules)"
    assert "(one of iqa_safe | randaugment, default iqa_safe)" in helped.stdout  # choices from the Literal type
    assert "      steps; 0 disables periodic evaluation" in helped.stdout  # meanings from the field comments
    for argv in (["--version"], ["--help"], ["data", "synth", "--help"], ["train", "--help"], ["pipeline", "--help"]):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=child_env())
        assert out.stdout.strip().splitlines()[-1] == "False", (argv, out.stdout[-300:])
    bad = run_sslfw(["data", "synth", "--out", str(tmp_path / "d"), "--koniq_count=notanumber"])
    assert bad.returncode == 2 and "--koniq-count" in bad.stderr  # the underscore spelling reached the flag


def test_pretrained_weights_bring_their_own_normalisation(tmp_path):
    """A locally saved timm model loads through model.pretrained and the model normalises with the mean/std of
    that model's own timm config (config.json beside the weights), else timm's for the name; the config file wins,
    and the resolved values are what a run saves."""
    import json

    import timm
    import torch

    from sslfw.model import IQAModel

    kwargs = {"channels": [8, 8, 16, 16], "stem_width": 8}
    saved = timm.create_model("resnet10t", pretrained=False, num_classes=0, **kwargs)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(saved.state_dict(), folder / "pytorch_model.bin")
    base = [
        "--model.name=resnet10t",
        f"--model.kwargs={json.dumps(kwargs)}",
        f"--model.pretrained={folder}/pytorch_model.bin",
    ]
    assert load_config(None, base).model.mean == [0.485, 0.456, 0.406]  # timm's resnet10t default
    (folder / "config.json").write_text(
        json.dumps({"architecture": "resnet10t", "pretrained_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}})
    )
    cfg = load_config(None, base)
    assert cfg.model.mean == [0.5, 0.4, 0.3] and cfg.model.std == [0.2, 0.25, 0.3]
    model = IQAModel(cfg.model)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    torch.testing.assert_close(model.backbone.conv1[0].weight, saved.conv1[0].weight)  # the file's weights
    x = torch.rand(2, 3, 32, 32)
    saved.eval(), model.eval()
    expected = saved(
        (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(model(x)["feat"], expected)
    assert load_config(None, [*base, "--model.mean=[0.1, 0.1, 0.1]"]).model.mean == [0.1, 0.1, 0.1]  # config wins
    save_config(cfg, tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]["std"] == [0.2, 0.25, 0.3]
    assert load_config(None, ["--model.name=vit_small_patch16_224"]).model.mean == [0.5, 0.5, 0.5]  # augreg ViT
    with pytest.raises(ConfigError, match="model.std: every value must be > 0"):
        load_config(None, ["--model.std=[0.2, 0, 0.2]"])


def test_every_shipped_config_loads():
    """configs/*.yaml: training configs resolve (model names, keys, ranges), pipeline configs pass their check."""
    from sslfw.commands.pipeline import PipelineConfig, check

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        if path.name.startswith("pipeline_"):
            p = parse_config(path, cls=PipelineConfig)
            check(replace(p, base=str(ROOT / p.base)))
        else:
            load_config(path)


def test_commands_print_a_short_summary_and_name_the_files_with_the_details(tiny_run, small_raw, tmp_path, capsys):
    from sslfw.cli import main

    assert main(["data", "prepare", "--koniq", str(small_raw / "koniq10k"), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["details"] == str(tmp_path / "m" / "meta.json") and set(summary["counts"]) >= {"train", "test"}
    assert len(out.out.splitlines()) <= 8 and "sources" not in summary  # meta.json has the rest
    assert main(["eval", "--checkpoint", str(tiny_run), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert set(summary["metrics"]) == {"n", "srcc", "plcc", "mae", "const_mae", "accuracy"}  # per level: eval.json
    full = json.loads((tmp_path / "ev" / "eval.json").read_text())["metrics"]
    assert "recall_class0" in full and summary["metrics"]["mae"] == round(full["mae"], 4)
    assert len(out.out.splitlines()) <= 10 and out.err.strip().endswith("s") and "[eval] done in" in out.err
    from sslfw.cli_help import headline

    val = {"val/ema/srcc": 0.123456, "val/student/srcc": 0.2, "val/ema/recall_class0": 1.0, "val/ema/n": 9}
    assert headline({"step": 3, "val": val}) == {"step": 3, "val": {"val/ema/srcc": 0.1235, "val/ema/n": 9}}
    assert headline({"val": {"samples": 12}}) == {"val": {"samples": 12}}  # not metrics: left whole


def test_a_misspelt_key_or_choice_is_answered_with_the_close_one():
    for args, hint in [(["--train.stesp=3"], "did you mean 'train.steps'?"),
                       (["--aug.strong=iqa_save"], "did you mean 'iqa_safe'?"),
                       (["--algorithm.name=fixmath"], "did you mean 'fixmatch'?")]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(hint)):
            load_config(None, args)


def test_help_reads_every_algorithms_params_from_source_as_the_registry_has_them():
    """`--help` lists the algorithms' settings without importing them (torch): what it reads must be what they are."""
    import dataclasses

    from sslfw.algorithms import names
    from sslfw.algorithms.base import REGISTRY
    from sslfw.cli_help import _yaml, algorithm_params

    read = algorithm_params()
    assert sorted(read) == names()
    for name in names():
        fields = {f.name: _yaml(f.default) for f in dataclasses.fields(REGISTRY[name].Params)}
        assert {k: v[1] for k, v in read[name].items()} == fields, name
