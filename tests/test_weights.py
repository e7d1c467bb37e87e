"""Package-shipped ImageNet weights: mapped onto timm by a checked rule, recorded by sha256, and still seeing."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from sslfw import weights
from sslfw.errors import ConfigError
from sslfw.fsio import sha256_file
from sslfw.model import IQAModel
from sslfw.runconfig import load_config

SPEC = "package:efficientnet_lite0"


def _imagenet_top1(model: torch.nn.Module, photo: np.ndarray) -> int:
    x = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    with torch.no_grad():
        return int(model((x - 0.5) / 0.5).argmax())


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_packaged_weights_put_the_cat_and_the_espresso_in_their_imagenet_classes(name):
    """The behaviour, not the shapes: after the order-and-shape mapping the ImageNet classifier still sees."""
    model = timm.create_model(name, pretrained=False).eval()
    weights.load_into(model, SPEC, name, classifier=True)
    assert _imagenet_top1(model, data.chelsea()) == 285  # Egyptian cat
    assert _imagenet_top1(model, data.coffee()) == 967  # espresso
    fresh = timm.create_model(name, pretrained=False).eval()  # the check can fail: random weights do not see
    assert (_imagenet_top1(fresh, data.chelsea()), _imagenet_top1(fresh, data.coffee())) != (285, 967)


def test_the_backbone_gets_the_files_tensors_and_the_run_records_them():
    cfg = load_config(None, ["--model.name=tf_efficientnet_lite0", f"--model.pretrained={SPEC}", "--model.img_size=32",
                             "--data.load_crop=32"])  # fmt: skip
    path = weights.resolve_file(SPEC)
    assert cfg.model.pretrained_sha256 == sha256_file(path) and len(cfg.model.pretrained_sha256) == 64
    assert cfg.model.mean == [0.5, 0.5, 0.5] and cfg.model.std == [0.5, 0.5, 0.5]  # what the TF-trained file expects
    model = IQAModel(cfg.model)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.backbone.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(model.backbone.blocks[6][0].bn1.running_var, raw["_blocks.15._bn0.running_var"])
    other = "--model.pretrained_sha256=" + "0" * 64
    with pytest.raises(ConfigError, match="pretrained_sha256"):  # other weights than the run recorded
        load_config(None, [f"--model.pretrained={SPEC}", "--model.name=tf_efficientnet_lite0", other])


def test_a_file_that_does_not_fit_is_one_error_naming_the_tensor(tmp_path):
    target = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2), "b.num_batches_tracked": torch.tensor(0)}
    same = {"x": torch.ones(4, 3), "y": torch.ones(2), "y_count.num_batches_tracked": torch.tensor(5)}
    mapped = weights.map_onto(same, target, "f.pth")  # other names: order and shape
    assert set(mapped) == {"a.weight", "b.weight"} and mapped["a.weight"].sum() == 12
    with pytest.raises(ConfigError, match=r"tensor 'y' \(3,\) would map onto 'b.weight' \(2,\)"):
        weights.map_onto({"x": torch.ones(4, 3), "y": torch.ones(3)}, target, "f.pth")
    with pytest.raises(ConfigError, match="first without a partner: 'z'"):
        weights.map_onto({**same, "z": torch.ones(1)}, target, "f.pth")
    with pytest.raises(ConfigError, match="fits timm's efficientnet_lite0 or tf_efficientnet_lite0, not 'resnet10t'"):
        weights.load_into(timm.create_model("resnet10t", num_classes=0), SPEC, "resnet10t")
    with pytest.raises(ConfigError, match="no such packaged weights"):
        load_config(None, ["--model.pretrained=package:vit_huge"])
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match="bad.pth is not a readable weights file"):
        weights.read_state(tmp_path / "bad.pth")
