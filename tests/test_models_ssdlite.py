"""SSDLite on MobileNetV2 against PAPER.md section 8 and the detection contract (anchor count and order)."""

import itertools
import math

import pytest
import torch
from torch import nn

from mnv2 import create_model
from mnv2.analysis import count_params
from mnv2.detection.anchors import feature_map_sizes, ssd_anchors
from mnv2.errors import UserError
from mnv2.models.ssdlite import extra_depth

TAPS_WIDTH_1 = [("layer15_expansion", 16, 576), ("head", 32, 1280), ("extra1", 64, 512), ("extra2", 128, 256),
                ("extra3", 256, 256), ("extra4", 512, 128)]


def _map_sizes(n: int) -> list[int]:
    """The contract's rule: stride-2 3x3 convs with padding 1 map n -> ceil(n / 2); four to stride 16, then halving."""
    for _ in range(4):
        n = math.ceil(n / 2)
    sizes = [n]
    for _ in range(5):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval-mode outputs are O(1) and comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("size,anchors", [(300, 1917), (320, 2034)])
def test_output_rows_equal_anchor_count(size, anchors):
    model = create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=3).eval()
    with torch.no_grad():
        cls, box = model(torch.zeros(1, 3, size, size))
    assert cls.shape == (1, anchors, 4) and box.shape == (1, anchors, 4)
    assert ssd_anchors(size, layout="tf").shape[0] == anchors


@pytest.mark.parametrize("size", [128, 160, 257, 300, 320])
@pytest.mark.parametrize("layout", ["tf", "torchvision"])
def test_feature_maps_and_rows_any_input_size(size, layout):
    model = create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=2, anchor_layout=layout).eval()
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        maps = model.forward_features(x)
        cls, box = model(x)
    sizes = _map_sizes(size)
    assert [tuple(f.shape[-2:]) for f in maps] == [(s, s) for s in sizes] == feature_map_sizes(size)
    assert [f.shape[1] for f in maps] == [m.channels for m in model.feature_maps]
    rows = sum(s * s * a for s, a in zip(sizes, model.num_anchors_per_location))
    assert cls.shape == (1, rows, 3) and box.shape == (1, rows, 4)
    assert ssd_anchors(size, layout=layout).shape[0] == rows


def test_feature_maps_at_width_1():
    model = create_model("ssdlite_mobilenet_v2")
    assert [(m.name, m.stride, m.channels) for m in model.feature_maps] == TAPS_WIDTH_1
    assert model.num_anchors_per_location == (3, 6, 6, 6, 6, 6)
    # PAPER.md section 8: 1x1 to depth/2, 3x3 depthwise stride 2, 1x1 to depth, each with BN + ReLU6
    for layer, depth in zip(model.extras, (512, 256, 256, 128)):
        assert layer.reduce.conv.out_channels == depth // 2 and layer.reduce.conv.kernel_size == (1, 1)
        assert layer.dw.conv.groups == depth // 2 and layer.dw.conv.stride == (2, 2)
        assert layer.project.conv.out_channels == depth
        assert all(isinstance(m.act, nn.ReLU6) for m in layer)
    x = torch.zeros(1, 3, 320, 320)
    with torch.no_grad():
        maps = model.eval().forward_features(x)
    assert _map_sizes(320) == [20, 10, 5, 3, 2, 1]
    assert [tuple(f.shape[1:]) for f in maps] == [(c, n, n) for (_, _, c), n in zip(TAPS_WIDTH_1, _map_sizes(320))]


def test_extra_layer_widths_follow_tf_depth_fn():
    # TF depth_fn: max(int(d * alpha), 16) -- truncation and a floor of 16, unlike the backbone's make_divisible
    assert [extra_depth(d, 0.35) for d in (512, 256, 128, 64)] == [179, 89, 44, 22]
    assert [extra_depth(d, 0.1) for d in (512, 256, 128, 64)] == [51, 25, 16, 16]
    model = create_model("ssdlite_mobilenet_v2", width_mult=0.1)
    assert [e.reduce.conv.out_channels for e in model.extras] == [25, 16, 16, 16]
    assert [m.channels for m in model.feature_maps][2:] == [51, 25, 25, 16]


@pytest.mark.parametrize("width", [0.35, 0.5, 1.0, 1.4])
def test_any_width_builds_and_runs(width):
    model = create_model("ssdlite_mobilenet_v2", width_mult=width, num_classes=5).eval()
    backbone = {t.name: t.channels for t in model.backbone.feature_taps}
    assert [m.channels for m in model.feature_maps[:2]] == [backbone["layer15_expansion"], backbone["head"]]
    assert [m.channels for m in model.feature_maps[2:]] == [extra_depth(d, width) for d in (512, 256, 256, 128)]
    with torch.no_grad():
        cls, box = model(torch.randn(1, 3, 128, 128))
    assert cls.shape == (1, 8 * 8 * 3 + (16 + 4 + 1 + 1 + 1) * 6, 6) and box.shape[:2] == cls.shape[:2]
    assert torch.isfinite(cls).all() and torch.isfinite(box).all()


def _head_params(c: int, out: int, heads: str) -> int:
    # SSDLite: depthwise 3x3 (9c) + BN (2c) + 1x1 with bias; SSD: one 3x3 conv with bias
    return 9 * c + 2 * c + c * out + out if heads == "ssdlite" else 9 * c * out + out


def _extra_params(cin: int, mid: int, out: int, heads: str) -> int:
    reduce = cin * mid + 2 * mid
    return reduce + (9 * mid + 2 * mid + mid * out + 2 * out if heads == "ssdlite" else 9 * mid * out + 2 * out)


@pytest.mark.parametrize("heads", ["ssdlite", "ssd"])
def test_param_count_decomposes_exactly(heads):
    model = create_model("ssdlite_mobilenet_v2", heads=heads)
    backbone = count_params(model.backbone)
    assert backbone == count_params(create_model("mobilenet_v2", num_classes=0)) == 3_504_872 - 1_281_000
    chans, anchors = [c for _, _, c in TAPS_WIDTH_1], (3, 6, 6, 6, 6, 6)
    extras = sum(_extra_params(cin, out // 2, out, heads) for cin, out in itertools.pairwise(chans[1:]))
    assert sum(count_params(e) for e in model.extras) == extras
    for head, c, a in zip(model.cls_heads, chans, anchors):
        assert count_params(head) == _head_params(c, a * 81, heads)
    for head, c, a in zip(model.box_heads, chans, anchors):
        assert count_params(head) == _head_params(c, a * 4, heads)
    cls_box = sum(_head_params(c, a * 81, heads) + _head_params(c, a * 4, heads) for c, a in zip(chans, anchors))
    assert count_params(model) == backbone + extras + cls_box
    # PAPER.md section 8, Table 5 (prediction layers, 80 classes): SSD 14.8M, SSDLite 2.1M; Table 6: 4.3M
    assert round((extras + cls_box) / 1e6, 1) == {"ssd": 14.8, "ssdlite": 2.1}[heads]
    if heads == "ssdlite":
        assert count_params(model) == 4_337_013 and round(count_params(model) / 1e6, 1) == 4.3


def test_backbone_loads_classifier_weights():
    classifier = _randomise_bn(create_model("mobilenet_v2", width_mult=0.35)).eval()
    model = create_model("ssdlite_mobilenet_v2", width_mult=0.35).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        ref = classifier.forward_taps(x, ["layer15_expansion", "head"])
        assert not torch.allclose(model.forward_features(x)[1], ref["head"])
        model.load_backbone_state(classifier.state_dict(), source="classifier")
        maps = model.forward_features(x)
    assert torch.equal(maps[0], ref["layer15_expansion"]) and torch.equal(maps[1], ref["head"])
    for key, value in classifier.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(model.state_dict()[f"backbone.{key}"], value)
    with pytest.raises(UserError, match="wrong.safetensors"):  # a width-1.0 classifier into a width-0.35 backbone
        model.load_backbone_state(create_model("mobilenet_v2").state_dict(), source="wrong.safetensors")
    with pytest.raises(UserError, match="does not have"):
        model.load_backbone_state({**classifier.state_dict(), "extra.weight": torch.zeros(1)}, source="x")


def test_rows_follow_contract_anchor_order():
    """Row = map offset + (y * W + x) * A_k + a; column c of that row = channel a * (C + 1) + c of the head output."""
    model = _randomise_bn(create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=2)).eval()
    raw = {}
    hooks = [h.pred.register_forward_hook(lambda m, i, o, k=k, kind=kind: raw.__setitem__((kind, k), o))
             for kind, heads in (("cls", model.cls_heads), ("box", model.box_heads)) for k, h in enumerate(heads)]
    with torch.no_grad():
        cls, box = model(torch.randn(1, 3, 128, 128))
    for h in hooks:
        h.remove()
    offset = 0
    for k, a in enumerate(model.num_anchors_per_location):
        o = raw[("cls", k)]
        _, _, hh, ww = o.shape
        for y, x, j in [(0, 0, 0), (hh - 1, ww - 1, a - 1), (hh // 2, ww - 1, a // 2)]:
            row = offset + (y * ww + x) * a + j
            assert torch.equal(cls[0, row], o[0, j * 3:(j + 1) * 3, y, x])
            assert torch.equal(box[0, row], raw[("box", k)][0, j * 4:(j + 1) * 4, y, x])
        offset += hh * ww * a
    assert offset == cls.shape[1]


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=4).train()
    cls, box = model(torch.randn(2, 3, 128, 128))
    assert torch.isfinite(cls).all() and torch.isfinite(box).all()
    (cls.square().sum() + box.square().sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing


def test_class_prior_initialisation():
    model = create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=4)
    for head in model.cls_heads:  # TF class_prediction_bias_init -4.6 on every column, background included
        assert torch.allclose(head.pred.bias, torch.full_like(head.pred.bias, math.log(0.01 / 0.99)))
    for head in model.box_heads:
        assert torch.equal(head.pred.bias, torch.zeros_like(head.pred.bias))
    torch.manual_seed(0)
    cls, _ = model.train()(torch.randn(2, 3, 128, 128))
    assert 0.005 < torch.sigmoid(cls).mean().item() < 0.02  # small weights: the prior, not the features, decides


def test_channels_last_and_bf16_autocast():
    model = _randomise_bn(create_model("ssdlite_mobilenet_v2", width_mult=0.5, num_classes=3)).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        cls, box = model(x)
        cls_cl, box_cl = model(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cls_bf, box_bf = model(x.contiguous(memory_format=torch.channels_last))
    assert box.abs().mean() > 1e-3  # the comparison below is not between near-zeros
    assert torch.allclose(cls_cl, cls, atol=1e-4) and torch.allclose(box_cl, box, atol=1e-4)
    assert cls_bf.dtype == box_bf.dtype == torch.bfloat16
    assert torch.isfinite(cls_bf).all() and torch.isfinite(box_bf).all()
    assert (cls_bf.float() - cls).abs().max() < 0.1 and (box_bf.float() - box).abs().max() < 0.1


def test_ssd_variant_uses_regular_convs():
    ssd, lite = create_model("ssdlite_mobilenet_v2", heads="ssd"), create_model("ssdlite_mobilenet_v2")
    assert all(h.pred.kernel_size == (3, 3) and not hasattr(h, "dw") for h in ssd.cls_heads)
    assert all(h.pred.kernel_size == (1, 1) and h.dw.conv.groups == h.dw.conv.in_channels for h in lite.cls_heads)
    assert all(e.conv.conv.kernel_size == (3, 3) and e.conv.conv.groups == 1 for e in ssd.extras)
    assert set(ssd.backbone.state_dict()) == set(lite.backbone.state_dict())
    with pytest.raises(ValueError, match="heads must be"):
        create_model("ssdlite_mobilenet_v2", heads="yolo")


@pytest.mark.parametrize("heads", ["ssdlite", "ssd"])
def test_bn_momentum_and_eps_from_kwargs(tmp_path, heads):
    """A TF-style BN (momentum 1 - decay, epsilon 1e-3) as model kwargs reaches every BatchNorm: the backbone's, the
    extra layers' and the heads'; parameters and state-dict keys do not change; a weights file rebuilds the same BN."""
    from mnv2.weights import load_model, save_model

    kwargs = {"width_mult": 0.35, "num_classes": 3, "heads": heads, "bn_momentum": 0.003, "bn_eps": 1e-3}
    model = create_model("ssdlite_mobilenet_v2", **kwargs)
    default = create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=3, heads=heads)

    def bn_settings(m: nn.Module) -> dict[str, tuple[float, float]]:
        return {name: (bn.momentum, bn.eps) for name, bn in m.named_modules() if isinstance(bn, nn.BatchNorm2d)}

    got = bn_settings(model)
    assert set(got.values()) == {(0.003, 1e-3)}
    assert any(k.startswith("backbone.") for k in got) and any(k.startswith("extras.") for k in got)
    assert any(k.startswith(("cls_heads.", "box_heads.")) for k in got) == (heads == "ssdlite")  # SSD heads: no BN
    assert set(bn_settings(default).values()) == {(0.1, 1e-5)} and bn_settings(default).keys() == got.keys()
    assert count_params(model) == count_params(default)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    loaded, _ = load_model(save_model(tmp_path / "w.safetensors", model, "ssdlite_mobilenet_v2", kwargs))
    assert set(bn_settings(loaded).values()) == {(0.003, 1e-3)}
    with pytest.raises(ValueError, match="bn_momentum"):
        create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=3, bn_momentum=0.0)
