"""timm's `mobilenetv2_035/050/075/100/140` weights -> ours.

timm's layout: `conv_stem` + `bn1`; `blocks.S.I` (stage S of Table 2, repeat I): the t=1 block is a
DepthwiseSeparableConv (`conv_dw, bn1, conv_pw, bn2`), the others InvertedResidual (`conv_pw, bn1, conv_dw, bn2,
conv_pwl, bn3`); `conv_head` + `bn2`; `classifier`. Symmetric padding and BN epsilon 1e-5, as ours. (The deeper
`mobilenetv2_110d/120d` have more repeats per stage; their weights do not fit Table 2 and are refused.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models import TABLE_2, MobileNetV2
from .common import IMAGENET_MEAN, IMAGENET_STD, Imported, infer_width, load_renamed, preprocess_record, require

# timm's pretrained configs of mobilenetv2_050/100/140: input 224, crop_pct 0.875, bicubic, ImageNet mean/std.
PREPROCESS = preprocess_record(IMAGENET_MEAN, IMAGENET_STD, resolution=224, crop_fraction=0.875,
                               interpolation="bicubic")


def module_names(model: MobileNetV2) -> dict[str, str]:
    """Our module path -> timm's, for every module holding tensors."""
    names = {"stem.conv": "conv_stem", "stem.bn": "bn1", "head.conv": "conv_head", "head.bn": "bn2",
             "classifier": "classifier"}
    stage_repeat = [(s, i) for s, (_, _, n, _) in enumerate(TABLE_2) for i in range(n)]
    for b, ((s, i), block) in enumerate(zip(stage_repeat, model.blocks, strict=True)):
        ours, theirs = f"blocks.{b}", f"blocks.{s}.{i}"
        if block.expand is None:  # timm's DepthwiseSeparableConv
            parts = {"dw.conv": "conv_dw", "dw.bn": "bn1", "project.conv": "conv_pw", "project.bn": "bn2"}
        else:
            parts = {"expand.conv": "conv_pw", "expand.bn": "bn1", "dw.conv": "conv_dw", "dw.bn": "bn2",
                     "project.conv": "conv_pwl", "project.bn": "bn3"}
        names |= {f"{ours}.{a}": f"{theirs}.{t}" for a, t in parts.items()}
    return names


def from_timm(state_dict: Mapping[str, torch.Tensor], origin: str = "timm state dict",
              preprocess: dict | None = None) -> Imported:
    """Our MobileNetV2 with timm `mobilenetv2_*` weights; width and classes are read from the shapes
    (a headless timm model, `num_classes=0`, gives a headless one)."""
    stem = require(state_dict, "conv_stem.weight", origin, "timm")
    first = require(state_dict, "blocks.0.0.conv_pw.weight", origin, "timm")
    last = require(state_dict, f"blocks.{len(TABLE_2) - 1}.0.conv_pwl.weight", origin, "timm")
    width = infer_width(stem.shape[0], first.shape[0], last.shape[0], origin)
    classifier = state_dict.get("classifier.weight")
    kwargs = {"width_mult": width, "num_classes": 0 if classifier is None else int(classifier.shape[0])}
    model = MobileNetV2(**kwargs)
    names = module_names(model)

    def source_key(key: str) -> str:
        module, _, param = key.rpartition(".")
        return f"{names[module]}.{param}"

    load_renamed(model, state_dict, source_key, origin)
    return Imported(model.eval(), kwargs, PREPROCESS | (preprocess or {}), "timm")
