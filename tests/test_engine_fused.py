"""Fused BN + ReLU6 for training (`mnv2.engine.fused`): the same function as BN then the activation."""

import copy

import pytest
import torch
from torch import nn

from mnv2 import create_model, native
from mnv2.engine import fused
from mnv2.models.blocks import ConvBNAct

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.status()}")


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5, floor: float = 1e-3) -> None:
    """Equal up to float32 rounding: max difference within `tol` of b's largest magnitude (sums of thousands of terms
    differ in their last bits between any two summation orders)."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * max(scale, floor), f"{what}: max difference {err:.3g} at scale {scale:.3g}"


def _pair(act: bool, momentum):
    torch.manual_seed(0)
    ref = ConvBNAct(12, 20, 3, stride=1, act=act)
    ref.bn.momentum = momentum
    with torch.no_grad():
        ref.bn.weight.uniform_(1.0, 3.0)  # wide enough for both ends of ReLU6 to clamp
        ref.bn.bias.uniform_(-0.5, 0.5)
    ref = ref.to(memory_format=torch.channels_last).train()
    ours = copy.deepcopy(ref)
    assert fused.enable(ours) == 1
    return ref, ours


@pytest.mark.parametrize("act, momentum", [(True, 0.1), (False, 0.01), (True, None)])
@pytest.mark.parametrize("threads", [1, 2])
def test_outputs_gradients_and_running_statistics_equal_pytorch(act, momentum, threads):
    torch.set_num_threads(threads)
    ref, ours = _pair(act, momentum)
    for step in range(3):
        x = (torch.randn(4, 12, 15, 13) * 2 + 0.3).contiguous(memory_format=torch.channels_last)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(4, 20, 15, 13)
        yr, yo = ref(xr), ours(xo)
        if act:  # the clamp must be doing something for the test to mean anything
            assert 0.05 < (yr == 0).float().mean() < 0.95 and (yr == 6).any()
        _close(yo, yr, "output")
        (yr * g).sum().backward()
        (yo * g).sum().backward()
        _close(xo.grad, xr.grad, "input gradient")
        for (name, pr), po in zip(ref.named_parameters(), ours.parameters(), strict=True):
            _close(po.grad, pr.grad, f"step {step}: {name}.grad")
        for (name, br), bo in zip(ref.named_buffers(), ours.buffers(), strict=True):
            _close(bo.double(), br.double(), f"step {step}: {name}")


def test_falls_back_where_the_kernels_do_not_apply():
    """Eval mode, NCHW activations and autocast run the module's own layers (the kernels are never called)."""
    ref, ours = _pair(True, 0.1)
    ref, ours = ref.to(memory_format=torch.contiguous_format), ours.to(memory_format=torch.contiguous_format)
    calls = []
    real = torch.ops.mnv2_native.bn_act_forward
    fused_fn = fused.bn_act

    def counting(x, bn, act):
        before = bn.num_batches_tracked.item()
        out = fused_fn(x, bn, act)
        calls.append(bn.num_batches_tracked.item() - before)
        return out

    ours.bn_act = counting
    x = torch.randn(2, 12, 9, 9)
    native_calls = []
    with torch.no_grad():
        torch.ops.mnv2_native.bn_act_forward = lambda *a: native_calls.append(a) or real(*a)
        try:
            torch.testing.assert_close(ours(x), ref(x))  # NCHW in training mode: PyTorch's BN, statistics and all
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours(x.contiguous(memory_format=torch.channels_last))  # bf16: PyTorch's BN
                ref(x.contiguous(memory_format=torch.channels_last))
            ref.eval(), ours.eval()
            torch.testing.assert_close(ours(x), ref(x))
        finally:
            torch.ops.mnv2_native.bn_act_forward = real
    assert len(calls) == 2 and not native_calls  # eval mode never reaches bn_act; the other two fell back


def test_whole_model_gradients_are_as_accurate_as_pytorchs():
    """MobileNetV2 0.35 (channels_last), one training forward / backward: the loss, BN running statistics and every
    gradient against a float64 copy of the model. A deep net's float32 gradients are ill-conditioned (an activation
    that lands on a ReLU6 threshold in one precision and not the other moves a whole channel's gradient), so PyTorch's
    own float32 BN is the yardstick: the fused path must be no less accurate."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ref = create_model("mobilenet_v2", width_mult=0.35, num_classes=5).to(memory_format=torch.channels_last)
    ours, f64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    assert fused.enable(ours) == 52  # stem, the 17 blocks' expansions (16), depthwise (17) and projections, head
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 96, 96, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (8,), generator=g)
    losses = {}
    for name, model in (("ref", ref), ("ours", ours), ("f64", f64)):
        torch.manual_seed(100)  # the same dropout mask for all three
        loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["ours"] - losses["f64"]) <= max(1e-5, 2 * abs(losses["ref"] - losses["f64"])), losses

    def error(model) -> float:
        diff = sum(((p.grad.double() - q.grad) ** 2).sum() for p, q in zip(model.parameters(), f64.parameters()))
        return (diff / sum((q.grad ** 2).sum() for q in f64.parameters())).sqrt().item()

    assert error(ours) <= 2 * error(ref) + 1e-6, (error(ours), error(ref))
    for (name, a), b in zip(ref.named_buffers(), ours.buffers(), strict=True):
        _close(b.double(), a.double(), name, tol=1e-4, floor=1.0)  # running statistics are O(1) quantities
