"""MobileNetV1 (Howard et al. 2017), the baseline of the MobileNetV2 paper's Tables 3, 4, 6 and 7."""

from __future__ import annotations

import torch
from torch import nn

from .base import Classifier, init_weights
from .blocks import ConvBNAct, Padding, make_divisible
from .features import FeatureTap

# MobileNetV1 body: (output channels, stride) of each depthwise-separable layer after the 32-channel stem.
LAYERS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv + BN + ReLU6, then 1x1 pointwise conv + BN + ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int = 1, bn_eps: float = 1e-5,
                 padding: Padding = "torch"):
        super().__init__()
        self.dw = ConvBNAct(in_ch, in_ch, 3, stride, dilation, groups=in_ch, bn_eps=bn_eps, padding=padding)
        self.pw = ConvBNAct(in_ch, out_ch, 1, bn_eps=bn_eps)


class MobileNetV1(Classifier):
    """MobileNetV1 with the same conventions as `MobileNetV2`: width multiplier rounded to multiples of 8, ReLU6,
    `forward_features` / `forward_head`, declared feature taps, atrous output stride."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 output_stride: int = 32, padding: Padding = "torch", bn_eps: float = 1e-5, round_nearest: int = 8):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.width_mult, self.num_classes, self.output_stride = width_mult, num_classes, output_stride
        in_ch = make_divisible(32 * width_mult, round_nearest)
        self.stem = ConvBNAct(3, in_ch, 3, stride=2, bn_eps=bn_eps, padding=padding)
        taps, layers = [FeatureTap("stem", 2, in_ch)], []
        current_stride, rate = 2, 1
        for i, (c, s) in enumerate(LAYERS):
            out_ch = make_divisible(c * width_mult, round_nearest)
            dilation = rate
            if s > 1 and current_stride >= output_stride:
                rate, s = rate * s, 1
            elif s > 1:
                current_stride *= s
            layers.append(DepthwiseSeparable(in_ch, out_ch, s, dilation, bn_eps, padding))
            in_ch = out_ch
            nxt = LAYERS[i + 1][1] if i + 1 < len(LAYERS) else 2
            if nxt > 1:  # the last layer at each resolution
                taps.append(FeatureTap(f"layer{i + 1}", current_stride, out_ch))
        self.blocks = nn.Sequential(*layers)
        self.feature_taps = tuple(taps)
        self._build_head(in_ch, num_classes, dropout)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_taps(self, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
        known = {t.name for t in self.feature_taps}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"unknown feature tap(s) {unknown}; this model has {sorted(known)}")
        out = {"stem": self.stem(x)}
        x = out["stem"]
        for i, layer in enumerate(self.blocks):
            x = layer(x)
            out[f"layer{i + 1}"] = x
        return {n: out[n] for n in names}
