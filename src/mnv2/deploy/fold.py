"""BatchNorm folding: every conv -> BN pair of a model becomes one conv with a bias (same outputs in eval mode)."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models.blocks import ConvBNAct


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with each `ConvBNAct`'s BN folded into its conv (the BN becomes Identity).

    The original is left untouched. Parameter names are unchanged except that BN entries disappear and folded convs
    gain a `bias`.
    """
    folded = copy.deepcopy(model).eval()
    for m in folded.modules():
        if isinstance(m, ConvBNAct) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            m.bn = nn.Identity()
    return folded
