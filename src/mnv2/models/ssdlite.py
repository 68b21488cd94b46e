"""SSDLite with a MobileNetV2 backbone (paper section 6.2, Tables 5-6; details from the TF Object Detection API's
`ssd_mobilenet_v2` feature extractor and convolutional box predictor in its ssdlite_mobilenet_v2_coco config).

The model returns raw per-anchor outputs only; anchors, matching, the loss and NMS live in `mnv2.detection`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .blocks import ConvBNAct
from .features import FeatureTap
from .mobilenetv2 import MobileNetV2

Heads = Literal["ssdlite", "ssd"]

# Paper section 6.2: SSDLite taps the expansion of layer 15 (stride 16) and the last 1280-channel layer (stride 32).
BACKBONE_TAPS = ("layer15_expansion", "head")
# Depth of the four extra feature layers (TF `feature_map_layout` layer_depth [-1, -1, 512, 256, 256, 128]).
EXTRA_DEPTHS = (512, 256, 256, 128)
# TF's `min_depth` of the SSD MobileNetV2 feature extractor.
MIN_DEPTH = 16


def extra_depth(depth: int, width_mult: float) -> int:
    """TF's `depth_fn = lambda d: max(int(d * depth_multiplier), min_depth)` for the extra layers (feature_map_generators
    .multi_resolution_feature_maps): truncation, not the backbone's make_divisible rounding."""
    return max(int(depth * width_mult), MIN_DEPTH)


class ExtraLayer(nn.Sequential):
    """One extra feature layer: 1x1 to depth/2, then a stride-2 3x3 to depth.

    SSDLite makes the 3x3 separable (depthwise + BN + ReLU6, then 1x1 + BN + ReLU6; TF `use_depthwise`); SSD keeps a
    regular 3x3 conv (paper section 6.2: SSDLite replaces "all the regular convolutions with separable convolutions").
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, heads: Heads, bn_eps: float):
        super().__init__()
        self.reduce = ConvBNAct(in_ch, mid_ch, 1, bn_eps=bn_eps)
        if heads == "ssdlite":
            self.dw = ConvBNAct(mid_ch, mid_ch, 3, stride=2, groups=mid_ch, bn_eps=bn_eps)
            self.project = ConvBNAct(mid_ch, out_ch, 1, bn_eps=bn_eps)
        else:
            self.conv = ConvBNAct(mid_ch, out_ch, 3, stride=2, bn_eps=bn_eps)


class PredictionHead(nn.Sequential):
    """Per-location predictions of one feature map: `out_ch` = anchors x (classes + 1) or anchors x 4.

    SSDLite (TF ConvolutionalBoxPredictor, use_depthwise): 3x3 depthwise + BN + ReLU6 (from the conv hyperparams'
    arg scope), then a 1x1 conv with bias and neither BN nor activation. SSD: one regular 3x3 conv with bias.
    """

    def __init__(self, in_ch: int, out_ch: int, heads: Heads, bn_eps: float):
        super().__init__()
        if heads == "ssdlite":
            self.dw = ConvBNAct(in_ch, in_ch, 3, groups=in_ch, bn_eps=bn_eps)
            self.pred = nn.Conv2d(in_ch, out_ch, 1)
        else:
            self.pred = nn.Conv2d(in_ch, out_ch, 3, padding=1)


class SSDLite(nn.Module):
    """MobileNetV2 + SSDLite: six feature maps, separate class and box heads on each.

    Args:
        num_classes: object classes C (the model predicts C + 1 scores per anchor, index 0 = background).
        width_mult: the backbone's width multiplier; the extra layers follow TF's depth_fn (see `extra_depth`).
        image_size: the training / evaluation input side the model is meant for (anchors are generated for it);
            forward accepts any size.
        anchor_layout: "tf" (3 anchors on the first map, 6 on the others) or "torchvision" (6 everywhere).
        heads: "ssdlite" (separable convs, the paper's design) or "ssd" (regular 3x3 convs, paper Table 5's baseline).
        bn_eps: BatchNorm epsilon (1e-5 PyTorch, 1e-3 TF).
        bn_momentum: every BatchNorm's momentum, the backbone's and the extra layers' and heads' (PyTorch's 0.1; a TF
            batch-norm decay d is momentum 1 - d).
        class_prior: initial foreground probability of every class score (TF class_prediction_bias_init -4.6).
    """

    def __init__(self, *, num_classes: int = 80, width_mult: float = 1.0, image_size: int = 320,
                 anchor_layout: str = "tf", heads: Heads = "ssdlite", bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 class_prior: float = 0.01):
        super().__init__()
        # Imported here: mnv2.detection builds on the models package, not the other way round.
        from ..detection.anchors import LAYOUTS, num_anchors_per_location

        if heads not in ("ssdlite", "ssd"):
            raise ValueError(f"heads must be 'ssdlite' or 'ssd', got {heads!r}")
        if anchor_layout not in LAYOUTS:
            raise ValueError(f"anchor_layout must be one of {LAYOUTS}, got {anchor_layout!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0 < class_prior < 1:
            raise ValueError(f"class_prior must be in (0, 1), got {class_prior}")
        self.num_classes, self.width_mult, self.image_size = num_classes, width_mult, image_size
        self.anchor_layout, self.heads = anchor_layout, heads

        self.backbone = MobileNetV2(num_classes=0, width_mult=width_mult, bn_eps=bn_eps, bn_momentum=bn_momentum)
        taps = {t.name: t for t in self.backbone.feature_taps}
        maps = [taps[name] for name in BACKBONE_TAPS]
        extras = []
        for i, depth in enumerate(EXTRA_DEPTHS, start=1):
            out_ch = extra_depth(depth, width_mult)
            extras.append(ExtraLayer(maps[-1].channels, extra_depth(depth // 2, width_mult), out_ch, heads, bn_eps))
            maps.append(FeatureTap(f"extra{i}", maps[-1].stride * 2, out_ch))
        self.extras = nn.ModuleList(extras)
        self.feature_maps: tuple[FeatureTap, ...] = tuple(maps)

        self.num_anchors_per_location = num_anchors_per_location(anchor_layout, len(maps))
        slots = num_classes + 1
        self.cls_heads = nn.ModuleList(PredictionHead(m.channels, a * slots, heads, bn_eps)
                                       for m, a in zip(maps, self.num_anchors_per_location))
        self.box_heads = nn.ModuleList(PredictionHead(m.channels, a * 4, heads, bn_eps)
                                       for m, a in zip(maps, self.num_anchors_per_location))
        self.class_prior = class_prior
        self._init_new_layers(class_prior)
        for m in self.modules():  # the backbone's are set already; momentum is training behaviour, not structure
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum

    def reset_classifier(self, num_classes: int) -> None:
        """New class predictors (the last conv of every class head) for `num_classes` object classes, initialised as
        a new model's are; backbone, extra layers, box heads and the class heads' depthwise convs are kept."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        for head, a in zip(self.cls_heads, self.num_anchors_per_location):
            old = head.pred
            head.pred = nn.Conv2d(old.in_channels, a * (num_classes + 1), old.kernel_size, padding=old.padding)
            nn.init.trunc_normal_(head.pred.weight, std=0.03, a=-0.06, b=0.06)
            nn.init.constant_(head.pred.bias, math.log(self.class_prior / (1 - self.class_prior)))

    def _init_new_layers(self, class_prior: float) -> None:
        # TF conv hyperparams of the ssdlite config: truncated normal, stddev 0.03 (torchvision's SSDLite: N(0, 0.03)).
        # He init would give the 1x1 predictors logits of unit scale; small weights keep the bias prior in charge.
        for module in (self.extras, self.cls_heads, self.box_heads):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.trunc_normal_(m.weight, std=0.03, a=-0.06, b=0.06)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        # Focal-loss prior (TF class_prediction_bias_init -4.6 = log(0.01 / 0.99)) on every one of the C + 1 columns,
        # as TF: each sigmoid starts at p, so the ~2000 mostly-negative anchors do not swamp the first steps.
        bias = math.log(class_prior / (1 - class_prior))
        for head in self.cls_heads:
            nn.init.constant_(head.pred.bias, bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six feature maps, in anchor order (strides 16, 32, 64, 128, 256, 512)."""
        taps = self.backbone.forward_taps(x, BACKBONE_TAPS)
        maps = [taps[name] for name in BACKBONE_TAPS]
        for layer in self.extras:
            maps.append(layer(maps[-1]))
        return maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [N, A, C + 1], box deltas [N, A, 4]); rows in the anchor order of `mnv2.detection.anchors`:
        map by map, row-major over (y, x), the anchors of a location consecutive (TF's reshape of [N, H, W, A_k * D])."""
        cls, box = [], []
        for f, cls_head, box_head in zip(self.forward_features(x), self.cls_heads, self.box_heads):
            cls.append(_flatten(cls_head(f), self.num_classes + 1))
            box.append(_flatten(box_head(f), 4))
        return torch.cat(cls, 1), torch.cat(box, 1)

    def load_backbone_state(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load a MobileNetV2 classifier's weights into the backbone (its `classifier.*` keys dropped), strictly."""
        from ..weights import load_state_dict_strict  # mnv2.weights imports the model registry

        backbone = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        load_state_dict_strict(self.backbone, backbone, source)


def _flatten(y: torch.Tensor, depth: int) -> torch.Tensor:
    """[N, A_k * depth, H, W] -> [N, H * W * A_k, depth]; reshape, not view: channels_last inputs permute to a
    contiguous tensor, others do not."""
    return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, depth)
