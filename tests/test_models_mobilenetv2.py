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


# ---- paper Figure 6b: the expansion shortcut at the design's places --------------------------------------------------

def _module_outputs(model: nn.Module, names, x: torch.Tensor) -> tuple[dict, dict]:
    """One forward pass of `model` on `x`; the outputs of the named modules, and the inputs of their depthwise convs
    (for block modules "blocks.i", the input of blocks[i].dw)."""
    modules = dict(model.named_modules())
    outputs, dw_inputs, handles = {}, {}, []
    for name in names:
        handles.append(modules[name].register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o)))
    for i, block in enumerate(model.blocks):
        handles.append(block.dw.register_forward_pre_hook(lambda m, a, i=i: dw_inputs.__setitem__(i, a[0])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs, dw_inputs


class TestExpansionShortcut:
    @pytest.mark.parametrize("width", [0.35, 0.5, 0.75, 1.0, 1.4])
    def test_same_count_at_the_same_blocks_as_the_design(self, width):
        design = create_model("mobilenet_v2", width_mult=width)
        wide = create_model("mobilenet_v2", width_mult=width, shortcut="expansion")
        residual_blocks = tuple(i for i, b in enumerate(design.blocks) if b.use_residual)
        assert design.shortcut_blocks == residual_blocks == (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)
        assert wide.shortcut_blocks == design.shortcut_blocks
        assert len(wide.shortcut_spans) == len(design.shortcut_spans) == 10
        assert not any(b.use_residual for b in wide.blocks)  # the thin residual is off in this variant
        assert wide.shortcut_spans == tuple((f"blocks.{i}.dw", f"blocks.{i + 1}.expand") for i in residual_blocks)
        assert design.shortcut_spans[0] == ("blocks.1", "blocks.2.project")
        none = create_model("mobilenet_v2", width_mult=width, shortcut="none")
        assert none.shortcut_blocks == none.shortcut_spans == ()

    @pytest.mark.parametrize("shortcut", ["bottleneck", "expansion"])
    def test_added_tensors_have_the_same_shape(self, shortcut):
        model = create_model("mobilenet_v2", width_mult=0.35, shortcut=shortcut).eval()
        names = {n for span in model.shortcut_spans for n in span}
        outputs, _ = _module_outputs(model, names, torch.randn(1, 3, 64, 64))
        for a, b in model.shortcut_spans:
            assert outputs[a].shape == outputs[b].shape, (a, b)

    def test_forward_equals_the_wide_residual_written_out(self):
        model = create_model("mobilenet_v2", width_mult=0.35, num_classes=5, shortcut="expansion").eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            h, carry, adds = model.stem(x), None, 0
            for i, b in enumerate(model.blocks):
                wide = b.expand(h) if b.expand is not None else h
                if carry is not None:
                    wide, adds = wide + carry, adds + 1
                filtered = b.dw(wide)
                h = b.project(filtered)  # no thin residual
                carry = filtered if i in model.shortcut_blocks else None
            assert adds == 10
            assert torch.allclose(model.forward_features(x), model.head(h), atol=1e-6)

    def test_next_block_sees_the_carried_depthwise_output(self):
        # training-mode BN normalises every layer: at initialisation, eval-mode activations fade to ~1e-12 deep down
        model = create_model("mobilenet_v2", width_mult=0.35, shortcut="expansion").train()
        names = {f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in ("expand", "dw")} - {
            "blocks.0.expand"}
        outputs, dw_inputs = _module_outputs(model, names, torch.randn(2, 3, 64, 64))
        for i in range(1, len(model.blocks)):
            own = outputs[f"blocks.{i}.expand"]
            if i - 1 in model.shortcut_blocks:
                carried = outputs[f"blocks.{i - 1}.dw"]
                assert carried.abs().sum() > 0
                assert torch.allclose(dw_inputs[i], own + carried, atol=1e-6), i
                assert not torch.allclose(dw_inputs[i], own, atol=1e-3), i  # the shortcut changes what block i filters
            else:
                assert torch.equal(dw_inputs[i], own), i

    def test_zeroing_a_depthwise_output_reaches_the_next_block_through_the_shortcut(self):
        """With block 4's depthwise output zeroed, block 5's depthwise input loses exactly that tensor: in this variant
        it is expand_5(project_4(0)) + 0, where the no-shortcut variant would give expand_5(project_4(0))."""
        model = create_model("mobilenet_v2", width_mult=0.35, shortcut="expansion").train()
        x = torch.randn(2, 3, 64, 64)
        _, before = _module_outputs(model, [], x)
        handle = model.blocks[4].dw.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        try:
            outputs, after = _module_outputs(model, ["blocks.5.expand"], x)
        finally:
            handle.remove()
        assert not torch.allclose(before[5], after[5])
        assert torch.allclose(after[5], outputs["blocks.5.expand"])  # only block 5's own expansion is left

    @pytest.mark.parametrize("size,os_", [(96, 32), (224, 32), (224, 16), (224, 8)])
    def test_forward_at_resolutions_and_output_strides(self, size, os_):
        model = create_model("mobilenet_v2", width_mult=0.35, shortcut="expansion", output_stride=os_,
                             num_classes=3).eval()
        design = create_model("mobilenet_v2", width_mult=0.35, output_stride=os_, num_classes=3)
        assert model.shortcut_blocks == design.shortcut_blocks and len(model.shortcut_blocks) == 10
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert model.forward_features(x).shape[-1] == -(-size // os_)
            assert torch.isfinite(model(x)).all()

    def test_layer15_tap_is_the_expanded_tensor_with_the_carry(self):
        model = create_model("mobilenet_v2", shortcut="expansion").eval()
        x = torch.randn(1, 3, 320, 320)
        _, dw_inputs = _module_outputs(model, [], x)
        with torch.no_grad():
            taps = model.forward_taps(x, ["layer15_expansion", "head"])
        tap = {t.name: t for t in model.feature_taps}["layer15_expansion"]
        assert taps["layer15_expansion"].shape == (1, tap.channels, 20, 20) == (1, 576, 20, 20)
        assert torch.equal(taps["layer15_expansion"], dw_inputs[13])  # block 12 carries into block 13
        assert torch.allclose(taps["head"], model.forward_features(x))

    def test_shapes_that_cannot_join_are_rejected(self):
        # the last block keeps stride 1 and 320 channels: its wide residual would need an 18th block
        last_has_shortcut = TABLE_2[:-1] + ((6, 320, 2, 1),)
        assert len(create_model("mobilenet_v2", setting=last_has_shortcut).shortcut_blocks) == 11
        with pytest.raises(ValueError, match="last block"):
            create_model("mobilenet_v2", setting=last_has_shortcut, shortcut="expansion")
        # block 2 (t = 6: 144 channels) would join block 3 (t = 3: 72 channels)
        mixed = ((1, 16, 1, 1), (6, 24, 2, 2), (3, 24, 1, 1))
        with pytest.raises(ValueError, match="144 channels.*72 channels"):
            create_model("mobilenet_v2", setting=mixed, shortcut="expansion")
