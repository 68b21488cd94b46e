"""bf16 autocast training: the strided depthwise conv's input gradient in fp32 (`mnv2.engine.bf16`)."""

import copy

import pytest
import torch

from mnv2.engine import bf16
from mnv2.models.blocks import ConvBNAct


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float) -> None:
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * max(scale, 1e-3), f"{what}: max difference {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("stride, size", [(2, 17), (2, 16), (1, 16)])
def test_strided_depthwise_under_autocast_computes_the_same_gradients(stride, size):
    """Outputs and gradients are those of the plain layer under autocast, up to bf16 rounding; the fp32 input gradient
    is taken for strided depthwise convs only."""
    torch.manual_seed(0)
    ref = ConvBNAct(24, 24, 3, stride=stride, groups=24).to(memory_format=torch.channels_last).train()
    ours = copy.deepcopy(ref)
    assert bf16.enable(ours) == 1
    x = torch.randn(4, 24, size, size).contiguous(memory_format=torch.channels_last)
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        y.backward(g)
        results.append((y.float(), xi.grad, model.conv.weight.grad, model.bn.running_var))
    for name, a, b in zip(("output", "input gradient", "weight gradient", "running variance"), results[1], results[0],
                          strict=True):
        _close(a.double(), b.double(), name, tol=2e-2)  # bf16 carries 8 bits of mantissa
    assert results[1][1].is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        route = type(bf16._conv(ours.conv, x.requires_grad_()).grad_fn).__name__
    assert ("StridedDepthwise" in route) == (stride == 2), route


def test_outside_autocast_and_in_eval_the_module_is_unchanged():
    torch.manual_seed(0)
    ref = ConvBNAct(16, 16, 3, stride=2, groups=16).to(memory_format=torch.channels_last).train()
    ours = copy.deepcopy(ref)
    bf16.enable(ours)
    x = torch.randn(2, 16, 13, 13).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(x), ref(x))  # fp32 training: the module's own forward, bit for bit
    ours.eval(), ref.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours.bn.running_mean, ref.bn.running_mean)
