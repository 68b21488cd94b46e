"""A segmentation model as one ONNX file: batch, height and width free (input [N, 3, H, W]), as the network runs at
each image's own size; with a resolution, H = W = R are fixed (the image is then stretched to R x R, mnv2.deploy.
segment). Checked against PyTorch with onnxruntime at two sizes before it is written.

The graph's output "logits" [N, C, h, w] are the class logits at the model's output stride (h = ceil(H / 16) at
OS 16), before the bilinear upsampling its `forward` ends with: that step and the argmax run fused in the predictor
(`mnv2.deploy.segment.class_map`, straight to each image's own size), instead of a C x H x W tensor leaving the
runtime (21 x 512 x 512 floats: 22 MB written and read again; 3.8-5.6 ms of the bench's 12.5 ms int8 end to end
when its graphs ended in them). Bilinear with align_corners=False (ONNX Resize, half_pixel) to the input's size, then
the argmax, gives the model's own output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_bytes
from ..errors import UserError
from .export import (
    DEFAULT_OPSET,
    META_CLASSES,
    META_MODEL,
    META_PREPROCESS,
    META_TASK,
    SEGMENTATION,
    _num_outputs,
    check_target,
    max_difference,
    to_onnx,
)
from .preprocess import Preprocess, dumps

# (batch, height, width) of the random inputs a segmentation graph is checked on: two aspect ratios, odd sizes that
# no stride divides, and a batch of two.
SEGMENTATION_CHECK_SHAPES = ((1, 96, 128), (2, 161, 97))


def segmentation_preprocess(stored: dict | None, resolution: int | None = None,
                            source: str = "segmentation model") -> Preprocess:
    """A segmentation model's preprocessing from its stored settings: normalise only, the network at each image's
    own size (resize "none", what `mnv2 eval` measures); with `resolution` -- or as stored by a fixed-size export --
    the image stretched to R x R (resize "stretch"), the mask then resized back to the image's size."""
    pre = dict(stored or {})
    resize = pre.get("resize", "none")
    if resize not in ("none", "stretch"):
        raise UserError(f"{source}: preprocess resize {resize!r} is not a segmentation model's ('none' or "
                        "'stretch')")
    pre["resize"] = "stretch" if resolution is not None else resize
    return Preprocess.from_dict(pre, resolution)


def segmentation_class_names(names: list[str] | None, num_classes: int, source: str = "segmentation model"
                             ) -> list[str]:
    """The stored class names (background first), else "class_N"; never ImageNet's, which are not pixel classes."""
    names = list(names or [f"class_{i}" for i in range(num_classes)])
    if len(names) != num_classes:
        raise UserError(f"{source}: the model predicts {num_classes} classes but has {len(names)} class names")
    return names


def segmentation_metadata(config: dict, preprocess: Preprocess, class_names: list[str]) -> dict[str, str]:
    return {META_TASK: dumps(SEGMENTATION),
            META_MODEL: dumps({"model": config.get("model"), "model_kwargs": config.get("model_kwargs", {})}),
            META_PREPROCESS: dumps(preprocess.to_dict()), META_CLASSES: dumps(class_names)}


class LogitsAtStride(nn.Module):
    """A segmentation model up to its class logits at the output stride (its `forward_logits_at_stride`): what the
    exported graph and the predictor's backends run. A model without that method runs whole."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        at_stride = getattr(self.model, "forward_logits_at_stride", None)
        return at_stride(x) if at_stride is not None else self.model(x)


def segmentation_onnx(model: nn.Module, config: dict, preprocess: Preprocess, opset: int = DEFAULT_OPSET):
    """A segmentation model as an onnx.ModelProto: input [N, 3, H, W] -> "logits" [N, C, h, w] at the output stride,
    batch free, H and W free unless `preprocess` stretches to a fixed size; metadata from `config` (as stored with
    its weights)."""
    num_classes = _num_outputs(model.eval(), 32)
    names = segmentation_class_names(config.get("class_names"), num_classes)
    return to_onnx(LogitsAtStride(model), preprocess.resolution, True, opset,
                   segmentation_metadata(config, preprocess, names), dynamic_size=preprocess.resize == "none")


@dataclass
class SegmentationExportReport:
    path: Path
    resolution: int | None  # None: height and width are free
    opset: int
    checked_shapes: tuple[tuple[int, int, int], ...]  # (batch, height, width) compared with PyTorch
    max_abs_diff: float
    max_abs_logit: float
    num_classes: int
    size_bytes: int


def export_segmenter(model: nn.Module, config: dict, out: str | Path, resolution: int | None = None,
                     opset: int = DEFAULT_OPSET, atol: float = 1e-4) -> SegmentationExportReport:
    """Write the segmentation model `model` (config as stored with its weights) to `out` as ONNX, only if
    onnxruntime running the serialised graph matches PyTorch at two input sizes (SEGMENTATION_CHECK_SHAPES, or
    batches 1 and 2 at a fixed `resolution`) to within `atol` times the largest |logit| (at least 1).

    Relative, as a detector's heads are checked: float32 convolutions err in proportion to their values, and
    per-pixel logits of a confident model reach the hundreds (a classifier's check stays absolute). Atomic: on any
    failure nothing appears at `out` and a file already there is left as it was.
    """
    out = check_target(out, opset)
    model = model.eval()
    preprocess = segmentation_preprocess(config.get("preprocess"), resolution)
    data = segmentation_onnx(model, config, preprocess, opset).SerializeToString()
    shapes = SEGMENTATION_CHECK_SHAPES if resolution is None else ((1, resolution, resolution),
                                                                   (2, resolution, resolution))
    diff, scale = max_difference(LogitsAtStride(model), data, preprocess.resolution, shapes=shapes)
    if not diff <= atol * max(1.0, scale):
        raise UserError(f"{out}: exported graph differs from PyTorch by {diff:.3g} (> {atol:g} x largest |logit| "
                        f"{scale:.3g}); not written")
    atomic_write_bytes(out, data)
    return SegmentationExportReport(out, resolution, opset, tuple(shapes), diff, scale,
                                    _num_outputs(model, 32), len(data))
