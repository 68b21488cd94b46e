"""Building blocks of MobileNetV2 (paper Table 1) and its ablations (paper Figure 6)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Padding = Literal["torch", "tf"]
BottleneckAct = Literal["linear", "relu6"]
Shortcut = Literal["bottleneck", "expansion", "none"]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never losing more than 10% (TF-Slim / torchvision rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: the extra row/column of padding goes to the bottom/right.

    Only strided convolutions differ from symmetric padding; TF-trained weights (Keras, TF-Slim) need this to give the
    same outputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = _same_pad(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_pad(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_pad(size, kernel: int, stride: int, dilation: int):
    out = (size + stride - 1) // stride
    return max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1,
           bias: bool = False, padding: Padding = "torch") -> nn.Conv2d:
    """A conv with 'same'-sized output: symmetric padding, or TF's asymmetric padding for strided convs."""
    if padding == "tf" and stride > 1:
        return Conv2dSame(in_ch, out_ch, kernel, stride, 0, dilation, groups, bias)
    return nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2 * dilation, dilation, groups, bias)


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> activation (ReLU6, or Identity for a linear layer), with stable names conv/bn/act.

    `train_forward`, when set (the training engine sets it: `engine.bf16`), computes the module in training mode in
    place of its three layers -- the same function on faster kernels. The model itself never sets it.
    """

    train_forward = None

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, dilation: int = 1, groups: int = 1,
                 act: bool = True, bn_eps: float = 1e-5, padding: Padding = "torch"):
        super().__init__()
        self.conv = conv2d(in_ch, out_ch, kernel, stride, dilation, groups, padding=padding)
        self.bn = nn.BatchNorm2d(out_ch, eps=bn_eps)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.train_forward is not None and self.training:
            return self.train_forward(self, x)
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """The bottleneck block of paper Table 1: 1x1 expansion, 3x3 depthwise, linear 1x1 projection.

    Ablation switches of paper Figure 6:
      - `bottleneck_act`: "linear" (the paper's design) or "relu6" (a non-linear bottleneck, Figure 6a).
      - `shortcut`: "bottleneck" (the design: a residual between the thin tensors, where the block keeps stride 1 and
        its channel count, `design_shortcut`), "expansion" (Figure 6b: the residual joins expanded tensors of
        consecutive blocks instead, as in classical residual networks) or "none". In this block "expansion" only turns
        the thin residual off; the wide residual crosses into the next block, so `MobileNetV2` places it (at the
        design's positions) and drives it through `forward_carry`. `forward` is the plain path.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: float, dilation: int = 1,
                 bn_eps: float = 1e-5, padding: Padding = "torch", bottleneck_act: BottleneckAct = "linear",
                 shortcut: Shortcut = "bottleneck", hidden: int | None = None):
        super().__init__()
        if bottleneck_act not in ("linear", "relu6"):
            raise ValueError(f"bottleneck_act must be 'linear' or 'relu6', got {bottleneck_act!r}")
        if shortcut not in ("bottleneck", "expansion", "none"):
            raise ValueError(f"shortcut must be 'bottleneck', 'expansion' or 'none', got {shortcut!r}")
        hidden = int(round(in_ch * expand_ratio)) if hidden is None else hidden
        self.in_ch, self.out_ch, self.hidden, self.stride = in_ch, out_ch, hidden, stride
        self.use_residual = shortcut == "bottleneck" and self.design_shortcut
        self.expand = ConvBNAct(in_ch, hidden, 1, bn_eps=bn_eps) if hidden != in_ch else None
        self.dw = ConvBNAct(hidden, hidden, 3, stride, dilation, groups=hidden, bn_eps=bn_eps, padding=padding)
        self.project = ConvBNAct(hidden, out_ch, 1, act=bottleneck_act == "relu6", bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        out = self.project(self.dw(h))
        return x + out if self.use_residual else out

    def forward_with_expansion(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its expanded tensor (the SSDLite "layer 15 expansion" tap)."""
        h = self.expand(x) if self.expand is not None else x
        out = self.project(self.dw(h))
        return (x + out if self.use_residual else out), h

    @property
    def design_shortcut(self) -> bool:
        """Whether the paper's design puts a residual here: stride 1 and as many channels out as in (paper Figure 4d)."""
        return self.stride == 1 and self.in_ch == self.out_ch

    def forward_carry(self, x: torch.Tensor, carry: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The expansion-shortcut path (Figure 6b): `carry`, the previous block's depthwise output, is added to this
        block's expanded tensor, and the sum goes on into the depthwise conv.

        Returns (output, expanded tensor with the carry added, depthwise output); the network passes the last on as
        the next block's carry where the design has a shortcut. The residual spans [projection, expansion] of two
        consecutive blocks -- wide -> thin -> wide, the classical residual of the paper's Figure 3a.
        """
        h = self.expand(x) if self.expand is not None else x
        if carry is not None:
            h = h + carry
        filtered = self.dw(h)
        return self.project(filtered), h, filtered
