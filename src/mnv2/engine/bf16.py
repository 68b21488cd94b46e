"""bf16 autocast training on CPUs without AMX: one slow oneDNN kernel routed around.

On this CPU (AVX512-BF16, no AMX) oneDNN's bf16 convolutions run ~1.7x faster than fp32, forward and backward, except
the input gradient of a strided depthwise convolution: 151 ms in bf16 against 23 ms in fp32 for one 32 x 96 x 112 x 112
layer, ~330 ms of a MobileNetV2 1.0 @ 224 batch-32 step over its four such layers -- enough to make bf16 training no
faster than fp32. `enable(model)` gives every `ConvBNAct` a training forward (`ConvBNAct.train_forward`) that, under
CPU autocast, computes that one gradient in fp32; the forward and the weight gradient stay bf16. Everything else, and
everything outside autocast, is the module's own forward. Parameters, buffers and state-dict keys are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import ConvBNAct


class _StridedDepthwise(torch.autograd.Function):
    """A strided depthwise convolution of low-precision tensors whose input gradient is computed in fp32."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        conf = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight.float(), grad.float(), *conf).to(x.dtype)
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, *conf)
        return grad_x.contiguous(memory_format=torch.channels_last), grad_w, None, None, None, None


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    strided_depthwise = (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels > 1
                         and conv.stride != (1, 1) and conv.bias is None and conv.padding_mode == "zeros")
    if not (strided_depthwise and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        return conv(x)
    dtype = torch.get_autocast_dtype("cpu")
    with torch.autocast("cpu", enabled=False):
        return _StridedDepthwise.apply(x.to(dtype), conv.weight.to(dtype), conv.stride, conv.padding, conv.dilation,
                                       conv.groups)


def conv_bn_act(m: ConvBNAct, x: torch.Tensor) -> torch.Tensor:
    """`m`'s training forward (see the module docstring)."""
    return m.act(m.bn(_conv(m.conv, x)))


def enable(model: nn.Module) -> int:
    """Give every ConvBNAct of `model` this training forward; returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, ConvBNAct)]
    for m in blocks:
        m.train_forward = conv_bn_act
    return len(blocks)
