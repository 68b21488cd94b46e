"""Every registered model: forward shape, no NaN, every parameter receives a gradient."""

import pytest
import torch

from mnv2 import create_model, list_models
from mnv2.errors import UserError

VARIANTS = [(name, {}) for name in list_models()] + [
    ("mobilenet_v2", {"width_mult": 0.35}),
    ("mobilenet_v2", {"width_mult": 1.4}),
    ("mobilenet_v2", {"bottleneck_act": "relu6"}),
    ("mobilenet_v2", {"shortcut": "expansion"}),
    ("mobilenet_v2", {"shortcut": "none"}),
    ("mobilenet_v2", {"output_stride": 8}),
    ("mobilenet_v2", {"padding": "tf", "bn_eps": 1e-3}),
    ("mobilenet_v1", {"width_mult": 0.5}),
    ("ssdlite_mobilenet_v2", {"width_mult": 0.35, "anchor_layout": "torchvision"}),
    ("ssdlite_mobilenet_v2", {"heads": "ssd", "image_size": 300}),
    ("deeplabv3_mobilenet_v2", {"output_stride": 8, "aspp": True, "feature": "head"}),
]


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=lambda v: str(v))
def test_forward_backward(name, kwargs):
    model = create_model(name, num_classes=5, **kwargs).train()
    x = torch.randn(2, 3, 96, 96)
    out = model(x)
    if isinstance(out, tuple):  # a detector: (class logits [N, A, C + 1], box deltas [N, A, 4]), one row per anchor
        from mnv2.detection import ssd_anchors
        anchors = len(ssd_anchors(96, layout=model.anchor_layout))
        assert [o.shape for o in out] == [(2, anchors, 6), (2, anchors, 4)]
    elif out.dim() == 4:  # a segmenter: per-pixel class logits at the input's size
        assert out.shape == (2, 5, 96, 96)
        out = (out,)
    else:
        assert out.shape == (2, 5)
        out = (out,)
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.square().sum() for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_registry_names_and_errors():
    assert {"mobilenet_v2", "mobilenet_v1"} <= set(list_models())
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        create_model("resnet")
    with pytest.raises(UserError, match="unexpected keyword"):
        create_model("mobilenet_v2", widht_mult=1.0)


def test_mobilenet_v1_baseline():
    model = create_model("mobilenet_v1")
    # MobileNetV1 1.0 with 1000 classes: 4,231,976 parameters (paper Table 4 rounds to 4.2M)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    assert model.feature_taps[-1].channels == 1024 and model.feature_taps[-1].stride == 32
