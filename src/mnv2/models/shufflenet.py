"""ShuffleNet v1 (Zhang et al. 2017), the comparison network of the MobileNetV2 paper's Tables 3 and 4.

A unit: 1x1 group conv (compress to a quarter of the stage width), channel shuffle, 3x3 depthwise, 1x1 group conv
(back to the stage width), residual add; a stride-2 unit concatenates a 3x3 average-pooled shortcut instead, so its
branch only produces the channels the stage adds. No activation after the depthwise or the second group conv (ShuffleNet
section 3.2); ReLU after the add / concat. As in the authors' release, the first 1x1 conv of the network's first unit is
not grouped (its 24 input channels are too few to split).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Classifier, init_weights
from .blocks import ConvBNAct

# ShuffleNet Table 1: output channels of stages 2, 3, 4 at width 1x, per number of groups g.
STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088),
                  8: (384, 768, 1536)}
STAGE_REPEATS = (4, 8, 4)  # units per stage; the first of each has stride 2
STEM_CHANNELS = 24


def stem_channels(width_mult: float, groups: int) -> int:
    """The stem's width as the authors' release builds it: 24 scaled by the width, except at 1.5x, where it stays 24
    (not 36: with it ShuffleNet 1.5x counts the 292M multiply-adds of the MobileNetV2 paper's Table 4), and at 0.5x
    with g = 8, where it is 16 (not 12)."""
    if width_mult == 1.5:
        return STEM_CHANNELS
    if width_mult == 0.5 and groups == 8:
        return 16
    return int(STEM_CHANNELS * width_mult)


class ConvBNReLU(ConvBNAct):
    """A ConvBNAct with ReLU (ShuffleNet's activation) in place of ReLU6, or linear when act=False."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__(in_ch, out_ch, kernel, stride, groups=groups, act=act)
        if act:
            self.act = nn.ReLU(inplace=True)


class ShuffleUnit(nn.Module):
    """ShuffleNet unit (ShuffleNet Figure 2b, stride 1; Figure 2c, stride 2)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, group_first: bool = True):
        super().__init__()
        mid = out_ch // 4
        branch = out_ch - in_ch if stride == 2 else out_ch
        first_groups = groups if group_first else 1
        for ch, what in ((mid, "bottleneck width"), (branch, "branch output")):
            if ch % groups:
                raise ValueError(f"ShuffleNet: {what} {ch} is not divisible by groups={groups}")
        self.compress = ConvBNReLU(in_ch, mid, 1, groups=first_groups)
        self.shuffle = nn.ChannelShuffle(groups)
        self.dw = ConvBNReLU(mid, mid, 3, stride, groups=mid, act=False)
        self.expand = ConvBNReLU(mid, branch, 1, groups=groups, act=False)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.dw(self.shuffle(self.compress(x))))
        if self.shortcut is not None:
            return self.act(torch.cat([self.shortcut(x), out], 1))
        return self.act(x + out)


class ShuffleNetV1(Classifier):
    """ShuffleNet v1 classifier. `width_mult` scales every layer (the paper's "ShuffleNet s x"); groups is g."""

    def __init__(self, num_classes: int = 1000, groups: int = 3, width_mult: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(STAGE_CHANNELS)}, got {groups}")
        self.groups, self.width_mult, self.num_classes = groups, width_mult, num_classes
        stem_ch = stem_channels(width_mult, groups)
        self.stem = ConvBNReLU(3, stem_ch, 3, stride=2)
        self.stem_pool = nn.MaxPool2d(3, 2, 1)
        units, in_ch = [], stem_ch
        for stage, (c, n) in enumerate(zip(STAGE_CHANNELS[groups], STAGE_REPEATS)):
            out_ch = int(c * width_mult)
            for i in range(n):
                units.append(ShuffleUnit(in_ch, out_ch, 2 if i == 0 else 1, groups,
                                         group_first=not (stage == 0 and i == 0)))
                in_ch = out_ch
        self.blocks = nn.Sequential(*units)
        self._build_head(in_ch, num_classes, dropout)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem_pool(self.stem(x)))


def shufflenet_v1(groups: int = 3, width_mult: float = 2.0, **kwargs) -> ShuffleNetV1:
    """The MobileNetV2 paper's comparison row by default: ShuffleNet 2x, g = 3 (its Tables 3 and 4)."""
    return ShuffleNetV1(groups=groups, width_mult=width_mult, **kwargs)
