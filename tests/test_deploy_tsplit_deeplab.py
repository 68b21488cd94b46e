"""Section 5.1's t-split on the atrous backbone of Mobile DeepLabv3 (section 6.3): dilated depthwise filters, the same
function as the eager model, on the native kernels and on the PyTorch slice loop."""

import pytest
import torch
import torch.nn.functional as F

from mnv2 import create_model, native
from mnv2.deploy import fold_bn, tsplit
from mnv2.deploy.tsplit import SplitBottleneck, TSplitDeepLab

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_bn(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():  # non-trivial BN, so that folding and the split have real work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _deeplab(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _random_bn(create_model("deeplabv3_mobilenet_v2", width_mult=0.5, **kwargs))
    torch.nn.init.normal_(model.logits.weight, std=0.5)  # logits of unit scale, not the training init's 0.01
    return model


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    assert out.shape == ref.shape and scale > 1e-2
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max abs difference {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("kwargs", [{}, {"aspp": True, "feature": "head"}])
def test_split_deeplab_equals_the_model(output_stride, kwargs, split_path):
    model = _deeplab(output_stride=output_stride, **kwargs)
    x = torch.randn(2, 3, 67, 93)  # maps of 5 x 6 (OS 16) / 9 x 12 (OS 8): dilated taps reach past every border
    with torch.no_grad():
        ref_map, ref = model.forward_features(x), model(x)
        ref_low = model.forward_logits_at_stride(x)
    for t in (1, 3, 1000):  # 1000: every op in one-channel slices
        split = tsplit(model, t)
        assert isinstance(split, TSplitDeepLab)
        ops = [op for op in split.model.backbone.body if isinstance(op, SplitBottleneck)]
        assert all(op._native == (split_path == "native") for op in ops)
        # the split ops carry the backbone's dilations: the depthwise of every block, in order
        assert [op.dw_conv.dilation[0] for op in ops] == [b.dw.conv.dilation[0] for b in model.backbone.blocks]
        _close(split.model.forward_features(x), ref_map)
        _close(split.forward_logits_at_stride(x), ref_low)
        _close(split(x), ref)
    assert max(b.dw.conv.dilation[0] for b in model.backbone.blocks) == 16 // output_stride * 2


def test_split_leaves_the_model_alone_and_rejects_mobilenet_v1():
    model = _deeplab()
    backbone = model.backbone
    split = tsplit(model, 2)
    assert model.backbone is backbone and isinstance(backbone.stem.bn, torch.nn.BatchNorm2d)  # not folded in place
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        _close(split(x), fold_bn(model)(x))
    with pytest.raises(TypeError, match="MobileNetV2 backbone"):
        tsplit(create_model("deeplabv3_mobilenet_v1", width_mult=0.25), 2)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("dilation", [2, 4, 3])
@pytest.mark.parametrize("size", [(1, 1), (3, 7), (9, 12), (17, 16)])
def test_native_dilated_depthwise_equals_conv2d(dilation, size):
    """The native 3x3 depthwise kernel at rates 2 and 4 (specialised) and 3 (the generic kernel), 'same' padding,
    on maps smaller and larger than the filter's span (the input-activation variant runs in the split tests above)."""
    h, w = size
    for c in (5, 24):  # a 4-wide vector plus a remainder; 16 + 8
        x = torch.randn(2, c, h, w)
        wt, b = torch.randn(c, 1, 3, 3), torch.randn(c)
        ref = F.conv2d(x, wt, b, 1, dilation, dilation, c).clamp(0, 6)
        x2d = x.permute(0, 2, 3, 1).reshape(-1, c)
        geometry = [3, 3, 1, 1, dilation, dilation, dilation, dilation, h, w]
        out = torch.ops.mnv2_native.depthwise_nhwc(x2d, 2, h, w, wt.flatten(1).t().contiguous(), b, 0.0, 6.0,
                                                   geometry)
        assert torch.allclose(out.view(2, h, w, c).permute(0, 3, 1, 2), ref, atol=1e-5)


def test_split_classifier_without_the_last_conv(split_path):
    """MNet V2*'s backbone as a classifier (`head_conv=False`): the pooled 320-channel map feeds the classifier."""
    torch.manual_seed(0)
    model = _random_bn(create_model("mobilenet_v2", width_mult=0.5, num_classes=10, head_conv=False, output_stride=8))
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # logits of unit scale
    x = torch.randn(2, 3, 65, 71)
    with torch.no_grad():
        ref, ref_map = model(x), model.forward_features(x)
    split = tsplit(model, 3)
    assert split.head is None and ref_map.shape[1] == 320 // 2
    _close(split(x), ref)
    _close(split.forward_features(x), ref_map)
