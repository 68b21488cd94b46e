"""Multiply-adds and parameter counts against PAPER.md section 2 and an independent layer-by-layer hand count."""

import pytest
import torch
from torch import nn

from mnv2 import create_model
from mnv2.analysis import count_madds, count_params, profile_layers

# PAPER.md section 2 (millions of multiply-adds, convs + final linear).
PAPER_MADDS = {
    (1.0, 224): 300.8, (1.0, 192): 221.3, (1.0, 160): 154.1, (1.0, 128): 99.1, (1.0, 96): 56.3,
    (1.4, 224): 582.2, (1.3, 224): 509.4, (0.75, 224): 209.1, (0.5, 224): 97.1, (0.35, 224): 59.3,
    (0.35, 96): 11.9,
}


@pytest.mark.parametrize("width,res", sorted(PAPER_MADDS))
def test_madds_within_half_a_million_of_paper(width, res):
    madds = count_madds(create_model("mobilenet_v2", width_mult=width), res)
    assert abs(madds / 1e6 - PAPER_MADDS[(width, res)]) <= 0.5


def _hand_count(model: nn.Module, size: int) -> int:
    """Independent count from layer hyper-parameters and output sizes: k*k*(cin/groups)*cout*H*W per conv."""
    total = 0
    sizes = {}

    def hook(m, inp, out):
        sizes[m] = out.shape[-2:]

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hd in hs:
        hd.remove()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            oh, ow = sizes[m]
            total += m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups) * m.out_channels * oh * ow
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


@pytest.mark.parametrize("name,width,size", [("mobilenet_v2", 1.0, 224), ("mobilenet_v2", 0.5, 131),
                                             ("mobilenet_v1", 1.0, 224)])
def test_madds_equal_hand_count(name, width, size):
    model = create_model(name, width_mult=width)
    assert count_madds(model, size) == _hand_count(model, size)


def test_paper_block_cost_formula():
    """Paper section 3: a bottleneck costs h*w*k*t*(k + 9 + k') multiply-adds (stride 1)."""
    from mnv2.models import InvertedResidual
    k, kp, t, hw = 32, 48, 6, 14
    block = InvertedResidual(k, kp, 1, t)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        block.eval()(torch.zeros(1, k, hw, hw))
    assert fc.get_total_flops() // 2 == hw * hw * k * t * (k + 9 + kp)


def test_per_layer_rows_sum_to_totals():
    model = create_model("mobilenet_v2")
    rows = profile_layers(model, 224)
    assert sum(r.madds for r in rows) == count_madds(model, 224)
    assert sum(r.params for r in rows) == count_params(model)
    assert rows[0].name == "stem" and rows[0].output_shape == (1, 32, 112, 112)
    assert rows[-1].name == "classifier" and rows[-1].output_shape == (1, 1000)
    dw = next(r for r in rows if r.name == "blocks.13.dw")
    assert dw.output_shape == (1, 576, 7, 7) and "dw" in dw.kind and "/2" in dw.kind


def test_count_restores_training_mode():
    model = create_model("mobilenet_v2", width_mult=0.35).train()
    count_madds(model, 96)
    assert model.training
