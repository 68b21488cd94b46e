"""The section 5.1 t-split executor computes the same function as the unsplit BN-folded model."""

import pytest
import torch

from mnv2 import create_model
from mnv2.deploy import fold_bn, tsplit
from mnv2.deploy.tsplit import SplitBottleneck

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(width: float = 1.0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", width_mult=width, num_classes=10, **kwargs).eval()
    for m in model.modules():  # non-trivial BN, so that folding and the split both have real work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _check(model, ts, x, path):
    with torch.no_grad():
        ref = fold_bn(model)(x)
    scale = ref.abs().max().item()
    assert scale > 1e-3  # a meaningful logit scale
    for t in ts:
        split = tsplit(model, t)
        assert all(op._native == (path == "native") for op in split.body if isinstance(op, SplitBottleneck))
        out = split(x)
        assert out.shape == ref.shape
        err = (out - ref).abs().max().item()
        assert err <= 1e-4 * scale, f"t={t}: max abs difference {err:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize("width", [0.35, 1.0, 1.4])
def test_split_equals_unsplit_for_t_1_to_6(width, split_path):
    _check(_model(width), range(1, 7), torch.randn(3, 3, 37, 45), split_path)


def test_split_into_one_channel_slices(split_path):
    model = _model(0.35)
    inner = max(b.hidden for b in model.blocks)  # the widest inner tensor: every op ends up in 1-channel slices
    _check(model, [inner], torch.randn(3, 3, 35, 33), split_path)


def test_split_with_tf_padding_atrous_and_relu6_bottleneck(split_path):
    _check(_model(0.75, padding="tf", output_stride=16), [3], torch.randn(3, 3, 49, 51), split_path)
    _check(_model(1.0, bottleneck_act="relu6"), [2, 5], torch.randn(1, 3, 41, 41), split_path)


@pytest.mark.usefixtures("split_path")
def test_channels_last_input_and_repeated_calls():
    model = _model(1.0)
    split = tsplit(model, 4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = fold_bn(model)(x)
    a, b = split(x), split(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(a, b) and (a - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_structure_stem_fused_and_uneven_slices():
    split = tsplit(_model(1.0), 5)
    first = split.body[0]
    assert isinstance(first, SplitBottleneck) and first.kind == "conv"  # stem conv is A of the first split op
    assert first.sizes == [7, 7, 6, 6, 6]  # 32 stem channels in 5 slices
    assert split.body[1].sizes == [20, 19, 19, 19, 19]  # 96 = 16 x 6 inner channels of block 1
    assert len(split.body) == 17  # stem + block 0 as one op, then the other 16 bottlenecks


def test_rejects_expansion_shortcut_and_bad_t():
    with pytest.raises(ValueError, match="expansion"):
        tsplit(_model(0.35, shortcut="expansion"), 2)
    with pytest.raises(ValueError, match="positive"):
        tsplit(_model(0.35), 0)


@pytest.mark.usefixtures("split_path")
@pytest.mark.parametrize("t", [2, 4, 5])
def test_only_one_slice_of_the_inner_tensor_is_alive(t):
    from mnv2.bench.memory import measure_peak_activation_bytes

    split = tsplit(_model(1.0), t)
    for block, (c, h, c_out, stride) in ((split.body[1], (16, 56, 24, 2)), (split.body[2], (24, 28, 24, 1))):
        x = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
        ho = h // stride
        out = c_out * ho * ho * 4
        # Slice i holds its expansion (n_i x h x h) and its depthwise output (n_i x ho x ho); from slice 2 on, the
        # output accumulator is alive too. Nothing else of the block's inner tensor may be.
        model_peak = max((out if i else 0) + n * (h * h + ho * ho) * 4 for i, n in enumerate(block.sizes))
        measured = measure_peak_activation_bytes(block, x)
        assert model_peak <= measured <= model_peak + 4096, (block.sizes, measured, model_peak)


def test_forward_features_equals_the_models():
    model = _model(1.0)
    x = torch.randn(2, 3, 50, 46)
    with torch.no_grad():
        ref = fold_bn(model).forward_features(x)
    out = tsplit(model, 3).forward_features(x)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_plain_convolution_path_equals_the_onednn_path(monkeypatch):
    """Without the native kernels the depthwise / stem convolutions run on oneDNN with prepacked weights and fused
    ReLU6 when it is available; without it (or for float64) the same slices run through F.conv2d + clamp_. Both must
    give the model's outputs."""
    import sys

    tsplit_module = sys.modules["mnv2.deploy.tsplit"]
    monkeypatch.setattr(tsplit_module, "_NATIVE", False)
    model = _model(0.5, padding="tf")
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad():
        ref = fold_bn(model)(x)
    fast = tsplit(model, 3)
    assert fast.body[1]._fast == tsplit_module._ONEDNN_CONV  # the oneDNN path is taken wherever it exists
    monkeypatch.setattr(tsplit_module, "_ONEDNN_CONV", False)
    plain = tsplit(model, 3)
    assert not plain.body[1]._fast
    a, b = fast(x), plain(x)
    scale = ref.abs().max()
    assert (a - ref).abs().max() <= 1e-4 * scale and (b - ref).abs().max() <= 1e-4 * scale
    monkeypatch.undo()
    double = tsplit(model, 3).double()  # converted after construction: the prepared slices follow the new dtype
    assert not double.body[1]._fast and not double.body[1]._native
    out = double(x.double())
    assert out.dtype == torch.float64 and (out - ref.double()).abs().max() <= 1e-4 * scale


@pytest.mark.usefixtures("split_path")
def test_copy_and_pickle_keep_the_function():
    """Packed oneDNN weights have no storage; deepcopy and torch.save must still work and compute the same outputs."""
    import copy
    import io

    split = tsplit(_model(0.35), 4)
    x = torch.randn(1, 3, 40, 40)
    ref = split(x)
    assert torch.equal(copy.deepcopy(split)(x), ref)
    buf = io.BytesIO()
    torch.save(split, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), ref)


def test_empty_batch_and_one_pixel_inputs(split_path):
    model = _model(0.35)
    assert tsplit(model, 4)(torch.randn(0, 3, 32, 32)).shape == (0, 10)
    _check(model, [1, 4], torch.randn(2, 3, 1, 1), split_path)  # every stride-2 op sees a 1 x 1 map
