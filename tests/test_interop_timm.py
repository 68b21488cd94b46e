"""timm mobilenetv2_035 ... _140 weights -> ours: same outputs, width and classes read from the shapes."""

import pytest
import timm
import torch
from _interop_helpers import assert_same_outputs, randomise_bn

from mnv2.errors import UserError
from mnv2.interop import from_timm


@pytest.mark.parametrize("name, width", [("mobilenetv2_035", 0.35), ("mobilenetv2_050", 0.5),
                                         ("mobilenetv2_075", 0.75), ("mobilenetv2_100", 1.0),
                                         ("mobilenetv2_140", 1.4)])
def test_outputs_match_timm(name, width):
    torch.manual_seed(0)
    ref = randomise_bn(timm.create_model(name, pretrained=False), seed=0)
    imported = from_timm(ref.state_dict())
    assert imported.model_kwargs == {"width_mult": width, "num_classes": 1000}
    assert imported.source == "timm" and not imported.model.training
    assert_same_outputs(ref, imported.model)


def test_headless_timm_model_gives_headless_model():
    ref = randomise_bn(timm.create_model("mobilenetv2_050", pretrained=False, num_classes=0), seed=1)
    imported = from_timm(ref.state_dict())
    assert imported.model_kwargs["num_classes"] == 0
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected, got = ref(x), imported.model(x)  # pooled 1280-d features on both sides
    assert got.shape == expected.shape == (1, 1280)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tag", ["mobilenetv2_050.lamb_in1k", "mobilenetv2_100.ra_in1k", "mobilenetv2_140.ra_in1k"])
def test_preprocess_record_is_timm_pretrained_config(tag):
    cfg = timm.models.get_pretrained_cfg(tag)
    record = from_timm(timm.create_model(tag.split(".")[0], pretrained=False).state_dict()).preprocess
    assert record["mean"] == list(cfg.mean) and record["std"] == list(cfg.std)
    assert record["resolution"] == cfg.input_size[-1]
    assert record["crop_fraction"] == cfg.crop_pct and record["interpolation"] == cfg.interpolation


def test_other_layouts_are_refused_naming_what_does_not_fit():
    state = timm.create_model("mobilenetv2_100", pretrained=False).state_dict()
    extra = state | {"blocks.6.1.conv_pw.weight": torch.zeros(1920, 320, 1, 1)}  # a second 320-channel repeat
    with pytest.raises(UserError, match=r"timm state dict: weights have key 'blocks\.6\.1\.conv_pw\.weight'"):
        from_timm(extra)
    # mobilenetv2_110d: width 1.1 with extra repeats, not one of Table 2's published widths.
    deeper = timm.create_model("mobilenetv2_110d", pretrained=False).state_dict()
    with pytest.raises(UserError, match="stem=32, first block=16, last block=352 match no MobileNetV2 width"):
        from_timm(deeper)
