"""torchvision's `mobilenet_v2` weights <-> ours.

torchvision's layout: `features.0` stem (conv, bn), `features.1..17` blocks whose `conv` Sequential holds
[expand ConvBNReLU (absent when t=1)], depthwise ConvBNReLU, project conv, project bn; `features.18` the 1x1 head;
`classifier.1` the linear layer (`classifier.0` is dropout). Same padding, BN epsilon and channel rounding as ours.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import UserError
from ..models import MobileNetV2
from ..models.blocks import Conv2dSame
from .common import IMAGENET_MEAN, IMAGENET_STD, Imported, infer_width, load_renamed, preprocess_record, require

# torchvision's IMAGENET1K_V1 evaluation: resize 256, centre crop 224, bilinear (its weights' `transforms()`).
PREPROCESS = preprocess_record(IMAGENET_MEAN, IMAGENET_STD, resolution=224, crop_fraction=224 / 256,
                               interpolation="bilinear")


def module_names(model: MobileNetV2) -> dict[str, str]:
    """Our module path -> torchvision's, for every module holding tensors."""
    names = {"stem.conv": "features.0.0", "stem.bn": "features.0.1"}
    for i, block in enumerate(model.blocks):
        prefix, j = f"features.{i + 1}.conv", 0
        if block.expand is not None:
            names |= {f"blocks.{i}.expand.conv": f"{prefix}.0.0", f"blocks.{i}.expand.bn": f"{prefix}.0.1"}
            j = 1
        names |= {f"blocks.{i}.dw.conv": f"{prefix}.{j}.0", f"blocks.{i}.dw.bn": f"{prefix}.{j}.1",
                  f"blocks.{i}.project.conv": f"{prefix}.{j + 1}", f"blocks.{i}.project.bn": f"{prefix}.{j + 2}"}
    head = f"features.{len(model.blocks) + 1}"
    return names | {"head.conv": f"{head}.0", "head.bn": f"{head}.1", "classifier": "classifier.1"}


def from_torchvision(state_dict: Mapping[str, torch.Tensor], origin: str = "torchvision state dict",
                     preprocess: dict | None = None) -> Imported:
    """Our MobileNetV2 with torchvision `mobilenet_v2` weights; width and classes are read from the shapes.

    `origin` names the weights in error messages (e.g. the file path); `preprocess` overrides entries of the
    IMAGENET1K_V1 preprocessing record (e.g. {"crop_fraction": 224 / 232} for the V2 weights).
    """
    stem = require(state_dict, "features.0.0.weight", origin, "torchvision")
    first = require(state_dict, "features.1.conv.1.weight", origin, "torchvision")
    last = require(state_dict, "features.17.conv.2.weight", origin, "torchvision")
    width = infer_width(stem.shape[0], first.shape[0], last.shape[0], origin)
    classifier = state_dict.get("classifier.1.weight")
    kwargs = {"width_mult": width, "num_classes": 0 if classifier is None else int(classifier.shape[0])}
    model = MobileNetV2(**kwargs)
    names = module_names(model)
    load_renamed(model, state_dict, lambda key: _rename(key, names), origin)
    return Imported(model.eval(), kwargs, PREPROCESS | (preprocess or {}), "torchvision")


def to_torchvision(model: MobileNetV2) -> dict[str, torch.Tensor]:
    """A state dict for `torchvision.models.mobilenet_v2(width_mult=model.width_mult, num_classes=model.num_classes)`.

    Raises UserError for models torchvision's network cannot reproduce (TF padding or BN epsilon, ablations,
    atrous output stride, no classifier).
    """
    problem = _torchvision_incompatibility(model)
    if problem:
        raise UserError(f"cannot export to torchvision's mobilenet_v2: {problem}")
    names = module_names(model)
    return {_rename(key, names): value.detach().clone() for key, value in model.state_dict().items()}


def _rename(key: str, names: dict[str, str]) -> str:
    module, _, param = key.rpartition(".")
    return f"{names[module]}.{param}"


def _torchvision_incompatibility(model: MobileNetV2) -> str | None:
    if any(isinstance(m, Conv2dSame) for m in model.modules()):
        return "the model uses TensorFlow 'SAME' padding (padding='tf')"
    if any(isinstance(m, nn.BatchNorm2d) and m.eps != 1e-5 for m in model.modules()):
        return "the model's BatchNorm epsilon is not torchvision's 1e-5"
    if model.shortcut != "bottleneck" or any(not isinstance(b.project.act, nn.Identity) for b in model.blocks):
        return "the model is an ablation (shortcut or bottleneck activation differ from the paper's design)"
    if model.output_stride != 32:
        return f"the model has output stride {model.output_stride} (torchvision's is 32)"
    if model.num_classes == 0:
        return "the model has no classifier (num_classes=0)"
    return None
