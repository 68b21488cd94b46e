"""Mobile DeepLabv3 (paper section 6.3, Table 7): the atrous backbones, the head, parameter counts, backbone loading."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mnv2 import create_model
from mnv2.analysis import count_params
from mnv2.errors import UserError
from mnv2.paper import reference
from mnv2.weights import save_model

pytestmark = pytest.mark.usefixtures("one_thread")

# (stride, dilation) of each of the 17 depthwise convs of MobileNetV2 (Table 2's strides: blocks 1, 3, 6, 13 have 2).
# PAPER.md section 9: once the running stride reaches the output stride, later strides become 1 and the depthwise
# convs dilate by the skipped stride; the block that loses its stride keeps the previous rate.
V2_DEPTHWISE = {
    32: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (2, 1)] + [(1, 1)] * 6 + [(2, 1)] + [(1, 1)] * 3,
    16: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (2, 1)] + [(1, 1)] * 6 + [(1, 1)] + [(1, 2)] * 3,
    8: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 1)] + [(1, 2)] * 6 + [(1, 2)] + [(1, 4)] * 3,
}
# The same for MobileNetV1's 13 depthwise-separable layers (strides 2 at layers 2, 4, 6, 12).
V1_DEPTHWISE = {
    16: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (2, 1)] + [(1, 1)] * 5 + [(1, 1), (1, 2)],
    8: [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1)] + [(1, 2)] * 5 + [(1, 2), (1, 4)],
}


def _depthwise(convs) -> list[tuple[int, int]]:
    return [(c.stride[0], c.dilation[0]) for c in convs]


@pytest.mark.parametrize("output_stride", [16, 8])
def test_atrous_mobilenet_v2_backbone(output_stride):
    model = create_model("deeplabv3_mobilenet_v2", output_stride=output_stride).eval()
    convs = [b.dw.conv for b in model.backbone.blocks]
    assert _depthwise(convs) == V2_DEPTHWISE[output_stride]
    assert all(c.padding[0] == c.dilation[0] for c in convs)  # 'same' size for every 3x3 rate
    # the classifier keeps Table 2's strides: the table above is what the output stride changed
    assert _depthwise(b.dw.conv for b in create_model("mobilenet_v2").blocks) == V2_DEPTHWISE[32]
    x = torch.randn(1, 3, 97, 129)
    with torch.no_grad():
        f = model.forward_features(x)
    assert f.shape == (1, 320, math.ceil(97 / output_stride), math.ceil(129 / output_stride))
    assert model.output_stride == output_stride


@pytest.mark.parametrize("output_stride", [16, 8])
def test_atrous_mobilenet_v1_backbone(output_stride):
    model = create_model("deeplabv3_mobilenet_v1", output_stride=output_stride).eval()
    assert _depthwise(layer.dw.conv for layer in model.backbone.blocks) == V1_DEPTHWISE[output_stride]
    with torch.no_grad():
        f = model.forward_features(torch.randn(1, 3, 65, 81))
    assert f.shape == (1, 1024, math.ceil(65 / output_stride), math.ceil(81 / output_stride))


@pytest.mark.parametrize("kwargs", [{}, {"aspp": True}, {"feature": "head", "output_stride": 8}])
def test_logits_at_the_input_size_for_non_square_inputs(kwargs):
    model = create_model("deeplabv3_mobilenet_v2", num_classes=7, **kwargs).eval()
    stride = kwargs.get("output_stride", 16)
    for h, w in ((65, 97), (100, 71)):
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            out, low = model(x), model.forward_logits_at_stride(x)
        assert out.shape == (2, 7, h, w)
        assert low.shape == (2, 7, math.ceil(h / stride), math.ceil(w / stride))
        # forward = the stride's logits, bilinearly upsampled with align_corners=False
        assert torch.allclose(out, F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False))


def test_head_layers():
    model = create_model("deeplabv3_mobilenet_v2", aspp=True).eval()
    # five branches of 256 (image pooling, 1x1, three 3x3) -> 256 -> classes; ReLU in the head, ReLU6 in the backbone
    assert model.concat_projection.conv.in_channels == 5 * 256 and model.logits.out_channels == 21
    assert model.logits.bias is not None and model.image_pooling.conv.conv.bias is None
    assert all(type(m.act) is nn.ReLU for m in [model.image_pooling.conv, *model.aspp, model.concat_projection])
    assert type(model.backbone.blocks[0].dw.act) is nn.ReLU6
    assert model.dropout.p == 0.1
    # the image pooling branch is its 1x1 value everywhere: bilinear upsampling of a 1x1 map
    f = torch.randn(2, 320, 5, 7)
    with torch.no_grad():
        pooled = model.image_pooling.conv(nn.AdaptiveAvgPool2d(1)(f))
        out = model.image_pooling(f)
        assert torch.equal(out, pooled.expand(-1, -1, 5, 7))
        assert torch.allclose(out, F.interpolate(pooled, size=(5, 7), mode="bilinear"), rtol=0, atol=1e-6)
    assert len(create_model("deeplabv3_mobilenet_v2").aspp) == 1  # without ASPP: image pooling + one 1x1 branch


@pytest.mark.parametrize("output_stride,rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_rates(output_stride, rates):
    model = create_model("deeplabv3_mobilenet_v2", output_stride=output_stride, aspp=True)
    atrous = [branch.conv for branch in model.aspp[1:]]
    assert model.atrous_rates == rates
    assert [c.dilation for c in atrous] == [(r, r) for r in rates] and [c.padding for c in atrous] == [(r, r)
                                                                                                       for r in rates]
    # regular 3x3 convs over all 320 channels (not depthwise-separable; see models/deeplab.py)
    assert all(c.kernel_size == (3, 3) and c.groups == 1 and c.in_channels == 320 for c in atrous)


def test_parameter_counts_are_the_papers():
    """Table 7's parameter counts, exactly ours rounded to the paper's 0.01M (21 classes, BN scale and offset)."""
    v2 = create_model("deeplabv3_mobilenet_v2")
    # backbone: the classifier (3,504,872) minus its linear layer (1,281,000) and the 1280-channel conv (412,160)
    assert count_params(v2.backbone) == 3_504_872 - 1_281_000 - 412_160 == 1_811_712
    # head: image pooling and 1x1 branches (320 * 256 + 512 each), projection (512 * 256 + 512), logits (256 * 21 + 21)
    assert count_params(v2) - count_params(v2.backbone) == 2 * 82_432 + 131_584 + 5_397
    counts = {
        ("MNet V2*", False): count_params(v2),
        ("MNet V2*", True): count_params(create_model("deeplabv3_mobilenet_v2", aspp=True)),
        ("MNet V1", True): count_params(create_model("deeplabv3_mobilenet_v1", aspp=True)),
    }
    assert counts == {("MNet V2*", False): 2_113_557, ("MNet V2*", True): 4_523_541, ("MNet V1", True): 11_145_301}
    for (network, stride, aspp, _), (_, paper_params, _) in reference.TABLE7.items():
        if network in reference.TABLE7_MODELS:
            assert round(counts[network, aspp] / 1e6, 2) == paper_params, (network, stride, aspp)
    # the output stride changes no weight; heads on the 1280-channel map add the 1280 conv (320 * 1280 + 2 * 1280)
    # and 960 more input channels to each of the two branches that read the map
    assert count_params(create_model("deeplabv3_mobilenet_v2", output_stride=8)) == 2_113_557
    assert count_params(create_model("deeplabv3_mobilenet_v2", feature="head")) == 2_113_557 + 412_160 + 2 * 960 * 256


def test_bad_arguments():
    for kwargs, match in (({"output_stride": 32}, "output_stride"), ({"feature": "stage6"}, "feature")):
        with pytest.raises(ValueError, match=match):
            create_model("deeplabv3_mobilenet_v2", **kwargs)
    with pytest.raises(ValueError, match="output_stride"):
        create_model("deeplabv3_mobilenet_v1", output_stride=32)


def _randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.mark.parametrize("feature", ["stage7", "head"])
def test_backbone_loads_a_classifier_weights_file(tmp_path, feature):
    classifier = _randomised(create_model("mobilenet_v2", width_mult=0.35, num_classes=10)).eval()
    path = save_model(tmp_path / "classifier.safetensors", classifier, "mobilenet_v2",
                      {"width_mult": 0.35, "num_classes": 10})
    model = create_model("deeplabv3_mobilenet_v2", width_mult=0.35, output_stride=8, feature=feature).eval()
    head_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    x = torch.randn(1, 3, 65, 65)
    # at OS 8 the layers up to the stride-8 stage are the classifier's own (dilation starts after them)
    with torch.no_grad():
        ref = classifier.forward_taps(x, ["stage3"])["stage3"]
        assert not torch.allclose(model.backbone.forward_taps(x, ["stage3"])["stage3"], ref, atol=1e-3)
        model.load_backbone_state(load_file(str(path)), source=str(path))
        assert torch.equal(model.backbone.forward_taps(x, ["stage3"])["stage3"], ref)
    own = model.backbone.state_dict()
    for key, value in classifier.state_dict().items():
        if key in own:
            assert torch.equal(own[key], value), key
    dropped = {k for k in classifier.state_dict() if k not in own}
    assert dropped == {k for k in classifier.state_dict()
                       if k.startswith("classifier.") or (feature == "stage7" and k.startswith("head."))}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in head_before.items())  # the head is left alone


def test_backbone_load_mismatch_is_an_error_naming_the_file(tmp_path):
    wider = create_model("mobilenet_v2", width_mult=0.5, num_classes=10)
    path = save_model(tmp_path / "width05.safetensors", wider, "mobilenet_v2", {"width_mult": 0.5})
    model = create_model("deeplabv3_mobilenet_v2", width_mult=0.35)
    with pytest.raises(UserError, match="width05.safetensors.*shape"):
        model.load_backbone_state(load_file(str(path)), source=str(path))
    v1 = create_model("deeplabv3_mobilenet_v1", width_mult=0.35)
    with pytest.raises(UserError, match="width05.safetensors"):  # a MobileNetV2 file into a MobileNetV1 backbone
        v1.load_backbone_state(load_file(str(path)), source=str(path))


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v2", "deeplabv3_mobilenet_v1"])
def test_bn_momentum_and_eps_from_kwargs(tmp_path, name):
    """A TF-style BN (momentum 1 - decay, epsilon 1e-3) as model kwargs reaches every BatchNorm, the backbone's and
    the head's; parameters and state-dict keys do not change; a weights file rebuilds the same BN."""
    from mnv2.weights import load_model

    kwargs = {"width_mult": 0.35, "num_classes": 5, "aspp": True, "bn_momentum": 0.003, "bn_eps": 1e-3}
    model = create_model(name, **kwargs)
    default = create_model(name, width_mult=0.35, num_classes=5, aspp=True)

    def bn_settings(m: nn.Module) -> dict[str, tuple[float, float]]:
        return {k: (bn.momentum, bn.eps) for k, bn in m.named_modules() if isinstance(bn, nn.BatchNorm2d)}

    got = bn_settings(model)
    assert set(got.values()) == {(0.003, 1e-3)}
    assert {k.split(".")[0] for k in got} == {"backbone", "image_pooling", "aspp", "concat_projection"}
    assert set(bn_settings(default).values()) == {(0.1, 1e-5)} and bn_settings(default).keys() == got.keys()
    assert count_params(model) == count_params(default)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    loaded, _ = load_model(save_model(tmp_path / "w.safetensors", model, name, kwargs))
    assert set(bn_settings(loaded).values()) == {(0.003, 1e-3)}
    with pytest.raises(ValueError, match="bn_momentum"):
        create_model(name, width_mult=0.35, bn_momentum=1.5)
