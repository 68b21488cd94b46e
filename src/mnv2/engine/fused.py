"""BatchNorm + ReLU6 fused for training, on mnv2's native kernels (`csrc/bn_act.cpp`).

`enable(model)` makes every `ConvBNAct` of `model` compute BN (batch statistics, running-statistics update) and its
clamp in one native forward and one native backward whenever it can: training mode, float32 on the CPU, channels_last
activations, an affine BN that tracks running statistics, a ReLU6 / ReLU / Identity activation. Anything else (eval
mode, autocast, NCHW, a GPU, no compiler) runs the module's own layers. The function is the same as BN followed by the
activation: the same outputs, gradients and running statistics (tests compare them with PyTorch's), and the module's
parameters, buffers and state-dict keys are untouched, so checkpoints, EMA, export and DDP see an ordinary model.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import native
from ..models.blocks import ConvBNAct

_INF = float("inf")


def _clamp_bounds(act: nn.Module) -> tuple[float, float] | None:
    """(lo, hi) of the activations the kernel fuses, or None."""
    if isinstance(act, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(act, nn.ReLU):
        return 0.0, _INF
    if isinstance(act, nn.Identity):
        return -_INF, _INF
    return None


class _BNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, lo: float, hi: float):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # channels_last memory as (pixels, channels): a view
        y, mask, mean, invstd, var = torch.ops.mnv2_native.bn_act_forward(rows, weight, bias, eps, lo, hi)
        ctx.save_for_backward(rows, mask, mean, invstd, weight)
        ctx.shape = (n, c, h, w)
        return y.view(n, h, w, c).permute(0, 3, 1, 2), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        rows, mask, mean, invstd, weight = ctx.saved_tensors
        n, c, h, w = ctx.shape
        dy_rows = dy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c)
        dx, dweight, dbias = torch.ops.mnv2_native.bn_act_backward(dy_rows, rows, mask, mean, invstd, weight)
        return dx.view(n, h, w, c).permute(0, 3, 1, 2), dweight, dbias, None, None, None


def bn_act(x: torch.Tensor, bn: nn.BatchNorm2d, act: nn.Module) -> torch.Tensor:
    """act(bn(x)), on the native kernels when the case is theirs (see the module docstring)."""
    bounds = _clamp_bounds(act)
    if not (bounds is not None and bn.training and bn.track_running_stats and bn.affine and x.dim() == 4
            and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled("cpu")):
        return act(bn(x))
    # BN's own bookkeeping, as nn.BatchNorm2d.forward does it: the batch count, then the momentum (or, with
    # momentum=None, a cumulative average).
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y, mean, var = _BNAct.apply(x, bn.weight, bn.bias, bn.eps, *bounds)
    rows = x.numel() // x.shape[1]
    with torch.no_grad():  # running variance: the unbiased estimate, as PyTorch keeps it
        bn.running_mean.lerp_(mean, momentum)
        bn.running_var.lerp_(var * (rows / max(rows - 1, 1)), momentum)
    return y


def enable(model: nn.Module) -> int:
    """Route every ConvBNAct of `model` through `bn_act`; returns how many, 0 if the native kernels are unavailable."""
    if not native.available():
        return 0
    blocks = [m for m in model.modules() if isinstance(m, ConvBNAct) and isinstance(m.bn, nn.BatchNorm2d)]
    for m in blocks:
        m.bn_act = bn_act
    return len(blocks)
