"""Parameter and multiply-add counts: one implementation for the tests, `mnv2 profile` and the paper report.

Multiply-adds are PyTorch's own FLOP counter (`torch.utils.flop_counter`) halved: it counts convolutions (depthwise
per group), matrix multiplies and linear layers, which is what the paper counts; BN, activations, pooling and residual
additions are not counted, as in the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.blocks import ConvBNAct


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input(model: nn.Module, input_size: int | tuple[int, int], batch: int = 1) -> torch.Tensor:
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    # On the model's device: a model built on the meta device is counted from shapes alone, without arithmetic.
    return torch.zeros(batch, 3, h, w, dtype=dtype, device=p.device if p is not None else None)


@torch.no_grad()
def _count(model: nn.Module, x: torch.Tensor) -> FlopCounterMode:
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter


def count_madds(model: nn.Module, input_size: int | tuple[int, int] = 224) -> int:
    """Multiply-adds of one forward pass on a single image of `input_size` (int or (H, W))."""
    return _count(model, _input(model, input_size)).get_total_flops() // 2


@dataclass
class LayerProfile:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    madds: int

    def to_dict(self) -> dict:
        return asdict(self)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The rows of a per-layer table: each conv-BN-act unit, and any conv / linear / BN that is not inside one."""
    rows, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, ConvBNAct):
            rows.append((name, m))
            inside.add(name)
        elif isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            rows.append((name, m))
    return rows


def profile_layers(model: nn.Module, input_size: int | tuple[int, int] = 224) -> list[LayerProfile]:
    """Per layer, in execution order: name, kind, output shape (batch 1), params and multiply-adds."""
    layers = _layers(model)
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []

    def hook(name):
        def record(_module, _inputs, output):
            if name not in shapes:
                order.append(name)
            shapes[name] = tuple(output.shape)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    try:
        counter = _count(model, _input(model, input_size))
    finally:
        for h in handles:
            h.remove()
    flops = counter.get_flop_counts()
    root = type(model).__name__
    by_name = dict(layers)
    rows = []
    for name in order:
        m = by_name[name]
        f = sum(flops.get(f"{root}.{name}", {}).values())
        kind = _kind(m)
        rows.append(LayerProfile(name, kind, shapes[name], count_params(m), f // 2))
    return rows


def _kind(m: nn.Module) -> str:
    conv = m.conv if isinstance(m, ConvBNAct) else m
    if isinstance(conv, nn.Conv2d):
        k = "x".join(map(str, conv.kernel_size))
        dw = " dw" if conv.groups > 1 and conv.groups == conv.in_channels else ""
        s = f" /{conv.stride[0]}" if conv.stride[0] > 1 else ""
        d = f" d{conv.dilation[0]}" if conv.dilation[0] > 1 else ""
        return f"conv {k}{dw}{s}{d}"
    return type(m).__name__.lower()
