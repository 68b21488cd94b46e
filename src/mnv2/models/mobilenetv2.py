"""MobileNetV2, paper Table 2, with the width multiplier, feature taps and atrous output stride (paper section 6.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Classifier, init_weights
from .blocks import BottleneckAct, ConvBNAct, InvertedResidual, Padding, Shortcut, make_divisible
from .features import FeatureTap

# Paper Table 2: expansion factor t, output channels c, repeats n, stride of the first repeat s.
TABLE_2 = (
    # t,   c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# The block whose expansion output SSDLite taps: TF's "layer_15/expansion_output", the first block of the 160-channel
# stage (torchvision's features[14].conv[0]); 576 channels at width 1.0, stride 16.
LAYER15_BLOCK = 13


class GlobalMaxPool(nn.Module):
    """Global max pooling as one max pool over the whole map. It exports to ONNX MaxPool, whose output shape
    onnxruntime's int8 quantiser infers; nn.AdaptiveMaxPool2d(1) exports to ReduceMax, whose shape it cannot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, kernel_size=x.shape[-2:])


class MobileNetV2(Classifier):
    """MobileNetV2 classifier.

    Args:
        num_classes: classifier outputs (0 for a headless backbone).
        width_mult: the paper's width multiplier alpha; channels are rounded to multiples of 8, the last conv keeps 1280
            channels when alpha < 1 (paper section 3.4).
        dropout: dropout before the classifier.
        expand_ratio: overrides t for every expanding block (paper Figure 6 ablation of the expansion factor).
        bottleneck_act, shortcut: the block ablation switches (paper Figure 6a, 6b). Every variant's shortcuts sit at
            the design's positions, `shortcut_blocks` (see `shortcut_spans` for what each one adds).
        output_stride: 32, 16 or 8; later strides become dilation (atrous backbone, paper section 6.3).
        padding: "torch" (symmetric) or "tf" (TensorFlow 'SAME' on strided convs) for TF-trained weights.
        bn_eps: BatchNorm epsilon (1e-5 in PyTorch, 1e-3 in TF / Keras).
        bn_momentum: BatchNorm running-statistics momentum in PyTorch's convention, 1 - TF's decay (0.1 in PyTorch;
            TF-Slim trained with decay 0.997, i.e. 0.003). Changes no parameter and no state-dict key.
        round_nearest: channel divisor.
        head_conv: False leaves out the last 1x1 conv (1280 channels): features end at the 320-channel output of the
            last bottleneck, the backbone of Mobile DeepLabv3's "MNet V2*" (paper section 6.3).
        pool: the global pooling before the classifier, "avg" (the paper's) or "max" (Keras models trained with
            GlobalMaxPooling2D); neither has parameters, so the state dict is the same.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 expand_ratio: float | None = None, bottleneck_act: BottleneckAct = "linear",
                 shortcut: Shortcut = "bottleneck", output_stride: int = 32, padding: Padding = "torch",
                 bn_eps: float = 1e-5, round_nearest: int = 8, bn_momentum: float = 0.1,
                 setting: Sequence[tuple[float, int, int, int]] = TABLE_2, head_conv: bool = True,
                 pool: str = "avg"):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1] (PyTorch's convention, 1 - TF's decay), got {bn_momentum}")
        self.width_mult, self.output_stride, self.shortcut = width_mult, output_stride, shortcut
        self.num_classes = num_classes

        stem_ch = make_divisible(STEM_CHANNELS * width_mult, round_nearest)
        head_ch = make_divisible(HEAD_CHANNELS * max(1.0, width_mult), round_nearest)
        self.stem = ConvBNAct(3, stem_ch, 3, stride=2, bn_eps=bn_eps, padding=padding)

        blocks, taps = [], [FeatureTap("stem", 2, stem_ch)]
        self._stage_ends: dict[int, str] = {}  # block index -> name of the stage tap it ends
        in_ch, current_stride, rate = stem_ch, 2, 1
        for stage, (t, c, n, s) in enumerate(setting, start=1):
            out_ch = make_divisible(c * width_mult, round_nearest)
            t = t if expand_ratio is None or t == 1 else expand_ratio
            for i in range(n):
                if len(blocks) == LAYER15_BLOCK:  # before this block's stride: the expansion precedes the depthwise
                    taps.append(FeatureTap("layer15_expansion", current_stride, int(round(in_ch * t))))
                stride = s if i == 0 else 1
                dilation = 1
                if stride > 1 and current_stride >= output_stride:
                    # Atrous: the block that loses its stride keeps the previous rate; later blocks use the new one.
                    dilation, rate, stride = rate, rate * stride, 1
                elif stride > 1:
                    current_stride *= stride
                else:
                    dilation = rate
                blocks.append(InvertedResidual(in_ch, out_ch, stride, t, dilation, bn_eps, padding, bottleneck_act,
                                               shortcut))
                in_ch = out_ch
            taps.append(FeatureTap(f"stage{stage}", current_stride, out_ch))
            self._stage_ends[len(blocks) - 1] = f"stage{stage}"
        self.blocks = nn.Sequential(*blocks)
        self.shortcut_blocks, self.shortcut_spans = _place_shortcuts(blocks, shortcut)
        # blocks whose depthwise output the next block adds to its expanded tensor (the expansion variant only)
        self._carry_from = frozenset(self.shortcut_blocks) if shortcut == "expansion" else frozenset()
        self.head = ConvBNAct(in_ch, head_ch, 1, bn_eps=bn_eps) if head_conv else None
        if head_conv:
            taps.append(FeatureTap("head", current_stride, head_ch))
        self.feature_taps: tuple[FeatureTap, ...] = tuple(taps)
        self._build_head(taps[-1].channels, num_classes, dropout)
        if pool == "max":
            self.pool = GlobalMaxPool()
        # Set here rather than passed down to every block: momentum is training behaviour, not structure.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        init_weights(self)

    def _run_blocks(self, x: torch.Tensor, taps: set[str] | None = None, out: dict | None = None) -> torch.Tensor:
        if self.shortcut == "expansion":
            return self._run_blocks_carrying(x, taps, out)
        for i, block in enumerate(self.blocks):
            if taps is not None and i == LAYER15_BLOCK and "layer15_expansion" in taps:
                x, out["layer15_expansion"] = block.forward_with_expansion(x)
            else:
                x = block(x)
            if taps is not None and self._stage_ends.get(i) in taps:
                out[self._stage_ends[i]] = x
        return x

    def _run_blocks_carrying(self, x: torch.Tensor, taps: set[str] | None, out: dict | None) -> torch.Tensor:
        """The blocks of the expansion-shortcut variant (Figure 6b): block i's depthwise output is carried into block
        i + 1's expanded tensor wherever the design has a shortcut in block i."""
        carry = None
        for i, block in enumerate(self.blocks):
            x, expanded, filtered = block.forward_carry(x, carry)
            carry = filtered if i in self._carry_from else None
            if taps is not None:
                if i == LAYER15_BLOCK and "layer15_expansion" in taps:
                    out["layer15_expansion"] = expanded  # with the carried sum: what the depthwise conv sees
                if self._stage_ends.get(i) in taps:
                    out[self._stage_ends[i]] = x
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-channel (at alpha <= 1) map before global pooling (the last bottleneck's without `head_conv`)."""
        x = self._run_blocks(self.stem(x))
        return x if self.head is None else self.head(x)

    def forward_taps(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The requested feature maps (names from `feature_taps`), from one pass through the network."""
        known = {t.name for t in self.feature_taps}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"unknown feature tap(s) {unknown}; this model has {sorted(known)}")
        wanted, out = set(names), {}
        x = self.stem(x)
        out["stem"] = x
        x = self._run_blocks(x, wanted, out)
        if "head" in wanted:
            out["head"] = self.head(x)
        return {n: out[n] for n in names}


def _place_shortcuts(blocks: Sequence[InvertedResidual], shortcut: Shortcut
                     ) -> tuple[tuple[int, ...], tuple[tuple[str, str], ...]]:
    """Where the network's shortcuts go: the blocks at which the design has one (stride 1, channels kept), and per
    shortcut the two modules whose outputs are added.

    "bottleneck": block i's input (the previous module's output) + block i's projection. "expansion": block i's
    depthwise output + block i + 1's expansion output, the same count at the same places, joining wide tensors. The
    wide tensors agree in resolution (block i keeps its stride of 1); their widths are checked here.
    """
    if shortcut == "none":
        return (), ()
    positions = tuple(i for i, b in enumerate(blocks) if b.design_shortcut)
    spans = []
    for i in positions:
        if shortcut == "bottleneck":
            spans.append((f"blocks.{i - 1}" if i > 0 else "stem", f"blocks.{i}.project"))
            continue
        if i + 1 == len(blocks):
            raise ValueError(f"shortcut='expansion': block {i}, the last block, has the design's shortcut, and the "
                             f"expansion shortcut would need a block {i + 1} to join")
        here, after = blocks[i], blocks[i + 1]
        if after.hidden != here.hidden:
            raise ValueError(f"shortcut='expansion': block {i}'s depthwise output ({here.hidden} channels) cannot be "
                             f"added to block {i + 1}'s expanded tensor ({after.hidden} channels); the expansion "
                             f"factors of the two blocks differ")
        spans.append((f"blocks.{i}.dw", f"blocks.{i + 1}.expand" if after.expand is not None else f"blocks.{i}"))
    return positions, tuple(spans)
