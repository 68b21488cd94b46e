"""MobileNetV2 against paper Table 2 and torchvision's implementation."""

import pytest
import torch
import torchvision
from torch import nn

from mnv2 import create_model
from mnv2.analysis import count_params
from mnv2.models import TABLE_2, InvertedResidual, make_divisible

# PAPER.md section 2: exact parameter counts with 1000 classes.
PAPER_PARAMS = {1.4: 6_108_776, 1.3: 5_386_792, 1.0: 3_504_872, 0.75: 2_636_424, 0.5: 1_968_680, 0.35: 1_677_128}


@pytest.mark.parametrize("width", sorted(PAPER_PARAMS))
def test_param_count_matches_paper_and_torchvision(width):
    ours = count_params(create_model("mobilenet_v2", width_mult=width))
    theirs = sum(p.numel() for p in torchvision.models.mobilenet_v2(width_mult=width).parameters())
    assert ours == PAPER_PARAMS[width] == theirs


def test_make_divisible_rule():
    assert make_divisible(32 * 0.35) == 16  # 8 would lose more than 10% of 11.2
    assert make_divisible(16 * 0.35) == 8
    assert make_divisible(96 * 1.3) == 128
    assert make_divisible(3) == 8


def test_blocks_follow_table_2():
    model = create_model("mobilenet_v2")
    expected = []
    in_ch = 32
    for t, c, n, s in TABLE_2:
        for i in range(n):
            expected.append((in_ch, c, s if i == 0 else 1, in_ch * t))
            in_ch = c
    got = [(b.in_ch, b.out_ch, b.stride, b.hidden) for b in model.blocks]
    assert got == expected
    assert len(model.blocks) == 17
    assert model.blocks[0].expand is None  # t = 1: no expansion conv
    # the residual joins bottlenecks only where stride 1 and channels agree
    assert [b.use_residual for b in model.blocks] == [s == 1 and i == o for i, o, s, _ in expected]


def test_last_layer_width_rule():
    assert create_model("mobilenet_v2", width_mult=0.5).head.conv.out_channels == 1280
    assert create_model("mobilenet_v2", width_mult=1.4).head.conv.out_channels == 1792


@pytest.mark.parametrize("size", [32, 33, 97, 224, 255])
def test_any_input_size(size):
    model = create_model("mobilenet_v2", width_mult=0.35, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_same_function_as_torchvision_with_copied_weights():
    """Our forward equals torchvision's when its weights are copied over position by position."""
    tv = torchvision.models.mobilenet_v2(width_mult=0.75).eval()
    ours = create_model("mobilenet_v2", width_mult=0.75).eval()
    tv_params = list(tv.state_dict().values())
    our_keys = list(ours.state_dict().keys())
    assert len(tv_params) == len(our_keys)
    ours.load_state_dict(dict(zip(our_keys, tv_params)))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)


def test_feature_taps_declared_and_delivered():
    model = create_model("mobilenet_v2").eval()
    taps = {t.name: t for t in model.feature_taps}
    assert (taps["layer15_expansion"].channels, taps["layer15_expansion"].stride) == (576, 16)
    assert (taps["stage7"].channels, taps["stage7"].stride) == (320, 32)
    assert (taps["head"].channels, taps["head"].stride) == (1280, 32)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        out = model.forward_taps(x, [t.name for t in model.feature_taps])
        # the expansion tap is the expansion conv's output of block 13 (torchvision's features[14].conv[0])
        h = x
        h = model.stem(h)
        for b in model.blocks[:13]:
            h = b(h)
        assert torch.equal(out["layer15_expansion"], model.blocks[13].expand(h))
        assert torch.allclose(out["head"], model.forward_features(x))
    for t in model.feature_taps:
        assert out[t.name].shape == (1, t.channels, 320 // t.stride, 320 // t.stride), t.name
    with pytest.raises(KeyError):
        model.forward_taps(x, ["nope"])


@pytest.mark.parametrize("os_, rates", [(32, []), (16, [2] * 3), (8, [2] * 7 + [4] * 3)])
def test_output_stride_by_dilation(os_, rates):
    model = create_model("mobilenet_v2", output_stride=os_).eval()
    with torch.no_grad():
        f = model.forward_features(torch.randn(1, 3, 224, 224))
    assert f.shape[-1] == 224 // os_
    # PAPER.md section 9: the block losing its stride keeps the previous rate, later blocks get the new one
    dilations = [b.dw.conv.dilation[0] for b in model.blocks]
    assert [d for d in dilations if d > 1] == rates
    assert all(b.dw.conv.stride[0] == 1 for b, d in zip(model.blocks, dilations) if d > 1)
    assert {t.name: t.stride for t in model.feature_taps}["head"] == os_
    # atrous changes no parameter
    assert count_params(model) == 3_504_872


def test_tf_padding_is_asymmetric_on_strided_convs():
    torch_pad = create_model("mobilenet_v2", width_mult=0.35).eval()
    tf_pad = create_model("mobilenet_v2", width_mult=0.35, padding="tf", bn_eps=1e-3).eval()
    tf_pad.load_state_dict(torch_pad.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = torch_pad.stem.conv(x), tf_pad.stem.conv(x)
        assert a.shape == b.shape == (1, 16, 112, 112)
        assert not torch.allclose(a, b)
        # TF 'SAME' for an even input pads one row/column at the bottom/right only
        padded = nn.functional.pad(x, [0, 1, 0, 1])
        ref = nn.functional.conv2d(padded, tf_pad.stem.conv.weight, None, 2)
        assert torch.allclose(b, ref, atol=1e-6)
    assert tf_pad.stem.bn.eps == 1e-3


class TestAblations:
    def test_none_shortcut_has_no_residual_add(self):
        model = create_model("mobilenet_v2", shortcut="none", width_mult=0.35)
        graph = torch.fx.symbolic_trace(model.blocks[2]).graph
        adds = [n for n in graph.nodes if n.target in (torch.add, "add", __import__("operator").add)]
        assert not adds
        base = torch.fx.symbolic_trace(create_model("mobilenet_v2", width_mult=0.35).blocks[2]).graph
        assert [n for n in base.nodes if n.target is __import__("operator").add]

    def test_relu6_bottleneck_adds_activation_after_projection(self):
        model = create_model("mobilenet_v2", bottleneck_act="relu6")
        assert all(isinstance(b.project.act, nn.ReLU6) for b in model.blocks)
        linear = create_model("mobilenet_v2")
        assert all(isinstance(b.project.act, nn.Identity) for b in linear.blocks)
        # same parameters: the switch changes the function, not the size
        assert count_params(model) == count_params(linear)
        x = torch.randn(1, 3, 64, 64)
        model.eval()
        with torch.no_grad():
            out = model.blocks[0](model.stem(x))
        assert out.min() >= 0 and out.max() <= 6

    def test_expansion_shortcut_joins_expanded_tensors(self):
        model = create_model("mobilenet_v2", shortcut="expansion").eval()
        assert not any(b.use_residual for b in model.blocks)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            h, carry = model.stem(x), None
            for b in model.blocks[:3]:
                h, carry = b.forward_carry(h, carry)
            # blocks 3-5: the 32-channel stage (block 3 has stride 2 and 144 inner channels, blocks 4-5 have 192)
            h3, carry3 = model.blocks[3].forward_carry(h, carry)
            assert torch.allclose(carry3, model.blocks[3].dw(model.blocks[3].expand(h)))  # shapes differ: no add
            h4, carry4 = model.blocks[4].forward_carry(h3, carry3)
            assert torch.allclose(carry4, model.blocks[4].dw(model.blocks[4].expand(h3)))  # 144 vs 192 channels
            h5, carry5 = model.blocks[5].forward_carry(h4, carry4)
            own = model.blocks[5].dw(model.blocks[5].expand(h4))
            assert torch.allclose(carry5, own + carry4)  # the wide tensors are joined
            assert torch.allclose(h5, model.blocks[5].project(own + carry4))
        assert model(x).shape == (1, 1000)

    def test_expand_ratio_switch(self):
        model = create_model("mobilenet_v2", expand_ratio=3)
        assert model.blocks[0].expand is None  # the t = 1 first block stays
        assert all(b.hidden == b.in_ch * 3 for b in model.blocks[1:])

    def test_bad_switch_values_rejected(self):
        with pytest.raises(ValueError):
            InvertedResidual(8, 8, 1, 6, shortcut="sideways")
        with pytest.raises(ValueError):
            create_model("mobilenet_v2", output_stride=4)


def test_bn_momentum_and_eps_from_kwargs(tmp_path):
    """TF-Slim's BN (decay 0.997, epsilon 1e-3) as model kwargs: every BN gets them, parameters and state-dict keys do
    not change, and a weights file records them so load_model rebuilds the same BN."""
    from mnv2.weights import load_model, save_model

    kwargs = {"width_mult": 0.35, "num_classes": 10, "bn_momentum": 0.003, "bn_eps": 1e-3}
    model = create_model("mobilenet_v2", **kwargs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 16 + 17 + 17 + 1  # stem, 16 expansions, 17 depthwise, 17 projections, the 1280 conv
    assert {(m.momentum, m.eps) for m in bns} == {(0.003, 1e-3)}
    default = create_model("mobilenet_v2", width_mult=0.35, num_classes=10)
    assert {(m.momentum, m.eps) for m in default.modules() if isinstance(m, nn.BatchNorm2d)} == {(0.1, 1e-5)}
    assert count_params(model) == count_params(default)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    loaded, config = load_model(save_model(tmp_path / "w.safetensors", model, "mobilenet_v2", kwargs))
    assert config["model_kwargs"]["bn_momentum"] == 0.003
    assert {(m.momentum, m.eps) for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)} == {(0.003, 1e-3)}
    with pytest.raises(ValueError, match="bn_momentum"):
        create_model("mobilenet_v2", bn_momentum=0.0)  # running statistics that never move
