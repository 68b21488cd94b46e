"""Mobile DeepLabv3 (paper section 6.3, Table 7; head details from TF DeepLab's `model.py`).

An atrous MobileNet backbone (later strides turned into dilation until the output stride, OS 16 or 8) and the DeepLabv3
head on one of its maps:

    image_pooling  global average pool -> 1x1 conv 256 + BN + ReLU -> back to the map's size
    aspp.0         1x1 conv 256 + BN + ReLU
    aspp.1-3       (aspp=True) 3x3 atrous conv 256 + BN + ReLU, rates 6, 12, 18 at OS 16 (12, 24, 36 at OS 8)
    concat -> concat_projection (1x1 conv 256 + BN + ReLU) -> dropout 0.1 -> logits (1x1 conv to classes, with bias)

and the logits bilinearly upsampled to the input's size. The head uses ReLU (TF DeepLab's arg scope), the backbone
keeps its ReLU6.

The ASPP convs are regular 3x3 convolutions, not separable ones. TF DeepLab's `aspp_with_separable_conv` flag can make
them depthwise + pointwise, but Table 7's parameter counts are those of regular convs: on the 320-channel map three
regular 3x3 convs of 256 bring MNet V2* from 2.11M to 4.52M parameters (the paper's two values, both to the 0.01M),
and on MobileNetV1's 1024-channel map to 11.15M (the paper's); separable ones would give 2.57M and 3.94M.

The model returns tensors only: `forward(x)` the per-pixel class logits [N, C, H, W] at the input's size,
`forward_logits_at_stride(x)` the logits at the output stride (before the upsampling). Training mode needs more than
one image per batch, or a map larger than 1x1, for the image pooling branch's BatchNorm (its map is 1x1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import init_weights
from .blocks import ConvBNAct, Padding
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import MobileNetV2

# TF DeepLab: depth of every head layer, and the ASPP rates at output stride 16 (doubled at 8).
HEAD_DEPTH = 256
ASPP_RATES_OS16 = (6, 12, 18)
OUTPUT_STRIDES = (8, 16)


class ConvBNReLU(ConvBNAct):
    """conv -> BN -> ReLU: the head's layers (TF DeepLab's activation is ReLU, not the backbone's ReLU6)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1, bn_eps: float = 1e-5):
        super().__init__(in_ch, out_ch, kernel, dilation=dilation, bn_eps=bn_eps)
        self.act = nn.ReLU(inplace=True)


class ImagePooling(nn.Module):
    """Image-level features: global average pool, 1x1 conv + BN + ReLU, spread back over the map.

    Bilinear upsampling of a 1x1 map to any size is that single value everywhere, so it is written as a broadcast:
    the same function without a resize op (F.interpolate gets there with weights summing to 1, to within an ulp).
    """

    def __init__(self, in_ch: int, out_ch: int, bn_eps: float):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = ConvBNReLU(in_ch, out_ch, 1, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x)).expand(-1, -1, *x.shape[-2:])


class DeepLabV3(nn.Module):
    """The DeepLabv3 head on one declared feature map of an atrous backbone.

    Args:
        backbone: a headless network with `feature_taps` and `forward_taps` (MobileNetV2, MobileNetV1), built with
            the output stride wanted.
        feature: the name of the tap the head sits on; its declared stride is the model's output stride (8 or 16).
        num_classes: segmentation classes (21 for PASCAL VOC, background included).
        aspp: add the three atrous 3x3 branches (rates 6, 12, 18 at OS 16, doubled at OS 8).
        dropout: before the logits (TF DeepLab keep_prob 0.9).
        bn_eps: BatchNorm epsilon of the head.
        bn_momentum: every BatchNorm's momentum, the backbone's and the head's (PyTorch's 0.1; a TF batch-norm decay d
            is momentum 1 - d); None leaves the backbone's as built and the head's at 0.1.
    """

    def __init__(self, backbone: nn.Module, feature: str, *, num_classes: int = 21, aspp: bool = False,
                 dropout: float = 0.1, bn_eps: float = 1e-5, bn_momentum: float | None = None):
        super().__init__()
        taps = {t.name: t for t in backbone.feature_taps}
        if feature not in taps:
            raise ValueError(f"feature must be one of {sorted(taps)}, got {feature!r}")
        if taps[feature].stride not in OUTPUT_STRIDES:
            raise ValueError(f"the head needs a map at output stride 8 or 16; {feature!r} is at stride "
                             f"{taps[feature].stride}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if bn_momentum is not None and not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1] (PyTorch's convention, 1 - TF's decay), got {bn_momentum}")
        self.backbone, self.feature = backbone, feature
        self.num_classes, self.output_stride = num_classes, taps[feature].stride
        self.width_mult = getattr(backbone, "width_mult", None)
        self.atrous_rates = tuple(r * 16 // self.output_stride for r in ASPP_RATES_OS16) if aspp else ()
        in_ch = taps[feature].channels

        self.image_pooling = ImagePooling(in_ch, HEAD_DEPTH, bn_eps)
        self.aspp = nn.ModuleList([ConvBNReLU(in_ch, HEAD_DEPTH, 1, bn_eps=bn_eps)])
        self.aspp.extend(ConvBNReLU(in_ch, HEAD_DEPTH, 3, dilation=r, bn_eps=bn_eps) for r in self.atrous_rates)
        branches = 1 + len(self.aspp)
        self.concat_projection = ConvBNReLU(branches * HEAD_DEPTH, HEAD_DEPTH, 1, bn_eps=bn_eps)
        self.dropout = nn.Dropout(dropout)
        for module in (self.image_pooling, self.aspp, self.concat_projection):
            init_weights(module)
        self.reset_classifier(num_classes)
        if bn_momentum is not None:  # momentum is training behaviour, not structure: set on the built model
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = bn_momentum

    def reset_classifier(self, num_classes: int) -> None:
        """A new logits layer for `num_classes` classes, initialised as a new model's is; the rest is kept."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.logits = nn.Conv2d(HEAD_DEPTH, num_classes, 1)
        # TF DeepLab's logits layer: truncated normal, stddev 0.01 (small logits at the start of training).
        nn.init.trunc_normal_(self.logits.weight, std=0.01, a=-0.02, b=0.02)
        nn.init.zeros_(self.logits.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone map the head sits on, [N, C_f, ceil(H / OS), ceil(W / OS)]."""
        return self.backbone.forward_taps(x, (self.feature,))[self.feature]

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Class logits at the feature map's resolution."""
        branches = [self.image_pooling(f), *(branch(f) for branch in self.aspp)]
        return self.logits(self.dropout(self.concat_projection(torch.cat(branches, 1))))

    def forward_logits_at_stride(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at the output stride, before the upsampling to the input's size."""
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits [N, num_classes, H, W] for an input [N, 3, H, W] of any size."""
        logits = self.forward_logits_at_stride(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def load_backbone_state(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load a classifier's weights into the backbone, strictly; its pooled classifier (`classifier.*`) is dropped,
        and so is a last conv the backbone does not have (`head.*`: MNet V2* stops at the 320-channel map)."""
        from ..weights import load_state_dict_strict  # mnv2.weights imports the model registry

        own = self.backbone.state_dict()
        dropped = ("classifier.",) + (("head.",) if not any(k.startswith("head.") for k in own) else ())
        backbone = {k: v for k, v in state_dict.items() if not k.startswith(dropped)}
        load_state_dict_strict(self.backbone, backbone, source)


def deeplabv3_mobilenet_v2(*, num_classes: int = 21, width_mult: float = 1.0, output_stride: int = 16,
                           aspp: bool = False, feature: str = "stage7", dropout: float = 0.1,
                           padding: Padding = "torch", bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> DeepLabV3:
    """Mobile DeepLabv3 on MobileNetV2. `feature="stage7"` is the paper's MNet V2* (the 320-channel output of the last
    bottleneck; the 1280-channel conv is then not built), `feature="head"` the 1280-channel map."""
    _check_output_stride(output_stride)
    if feature not in ("stage7", "head"):
        raise ValueError(f"feature must be 'stage7' (MNet V2*) or 'head' (the 1280-channel map), got {feature!r}")
    backbone = MobileNetV2(num_classes=0, width_mult=width_mult, output_stride=output_stride, padding=padding,
                           bn_eps=bn_eps, bn_momentum=bn_momentum, head_conv=feature == "head")
    return DeepLabV3(backbone, feature, num_classes=num_classes, aspp=aspp, dropout=dropout, bn_eps=bn_eps,
                     bn_momentum=bn_momentum)


def deeplabv3_mobilenet_v1(*, num_classes: int = 21, width_mult: float = 1.0, output_stride: int = 16,
                           aspp: bool = False, dropout: float = 0.1, padding: Padding = "torch",
                           bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> DeepLabV3:
    """Mobile DeepLabv3 on MobileNetV1 (Table 7's "MNet V1"): the head on its last, 1024-channel map."""
    _check_output_stride(output_stride)
    backbone = MobileNetV1(num_classes=0, width_mult=width_mult, output_stride=output_stride, padding=padding,
                           bn_eps=bn_eps)
    return DeepLabV3(backbone, backbone.feature_taps[-1].name, num_classes=num_classes, aspp=aspp, dropout=dropout,
                     bn_eps=bn_eps, bn_momentum=bn_momentum)


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be 8 or 16 (the paper's), got {output_stride}")
