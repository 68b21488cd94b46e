"""SSD anchors (default boxes) for SSDLite, paper section 6.2: TF's `ssd_anchor_generator` or torchvision's layout.

Anchors are (cx, cy, w, h) in coordinates normalised to the network input. Their order is the head's output order:
feature maps in order, row-major over (y, x) within a map, the anchor shapes in spec order within a location.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import UserError

LAYOUTS = ("tf", "torchvision")
NUM_LAYERS = 6

# TF Object Detection API, ssdlite_mobilenet_v2_coco.config: `ssd_anchor_generator` aspect ratios, in this order (the
# config writes 1/3 as 0.3333); every layer but the lowest also gets an interpolated square anchor.
TF_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
# TF's `reduce_boxes_in_lowest_layer`: the stride-16 map has only these (scale, aspect ratio) specs, scale None = s_0.
TF_LOWEST_LAYER = ((0.1, 1.0), (None, 2.0), (None, 0.5))
# torchvision's ssdlite320: DefaultBoxGenerator([[2, 3]] * 6): two squares plus (w, h) and (h, w) for each ratio.
TORCHVISION_ASPECT_RATIOS = (2.0, 3.0)


def _check(layout: str, num_layers: int) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"anchor layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if num_layers < 2:
        raise UserError(f"anchor num_layers={num_layers}: SSD needs at least 2 feature maps")


def _pair(image_size: tuple[int, int] | int) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise UserError(f"image_size {image_size!r} is not a positive integer or (height, width) pair")
    return int(h), int(w)


def _scales(num_layers: int, min_scale: float, max_scale: float) -> list[float]:
    # SSD paper eq. 4 / TF `create_ssd_anchors`: linear in the layer index, 1.0 appended so the last layer has a
    # "next" scale for its interpolated square anchor.
    return [min_scale + (max_scale - min_scale) * k / (num_layers - 1) for k in range(num_layers)] + [1.0]


def _layer_shapes(layout: str, num_layers: int, min_scale: float, max_scale: float) -> list[list[tuple[float, float]]]:
    """Per layer, the (w, h) of each anchor shape at one location, before any non-square correction."""
    scales = _scales(num_layers, min_scale, max_scale)
    shapes = []
    for k in range(num_layers):
        s, s_next = scales[k], scales[k + 1]
        if layout == "tf":
            if k == 0:
                specs = [(s if sc is None else sc, ar) for sc, ar in TF_LOWEST_LAYER]
            else:
                specs = [(s, ar) for ar in TF_ASPECT_RATIOS] + [(math.sqrt(s * s_next), 1.0)]
            shapes.append([(sc * math.sqrt(ar), sc / math.sqrt(ar)) for sc, ar in specs])
        else:
            s_prime = math.sqrt(s * s_next)
            layer = [(s, s), (s_prime, s_prime)]
            for ar in TORCHVISION_ASPECT_RATIOS:
                layer += [(s * math.sqrt(ar), s / math.sqrt(ar)), (s / math.sqrt(ar), s * math.sqrt(ar))]
            # torchvision clips the (w, h) of its default boxes to [0, 1] (DefaultBoxGenerator(clip=True)).
            shapes.append([(min(w, 1.0), min(h, 1.0)) for w, h in layer])
    return shapes


def num_anchors_per_location(layout: str = "tf", num_layers: int = NUM_LAYERS) -> tuple[int, ...]:
    """Anchors per feature-map location of each layer: tf -> (3, 6, 6, 6, 6, 6), torchvision -> (6,) * 6."""
    _check(layout, num_layers)
    return tuple(len(layer) for layer in _layer_shapes(layout, num_layers, 0.2, 0.95))


def feature_map_sizes(image_size: tuple[int, int] | int, num_layers: int = NUM_LAYERS) -> list[tuple[int, int]]:
    """(height, width) of the SSDLite feature maps for an input of `image_size` ((h, w) or a side)."""
    h, w = _pair(image_size)
    sizes = []
    # Every stride-2 3x3 conv with padding 1 maps n -> ceil(n / 2). Four of them (stem and the first blocks of the
    # 24, 32 and 64-channel stages) lead to the stride-16 layer-15 map; each later map halves again (1 stays 1).
    for step in range(4 + num_layers - 1):
        h, w = -(-h // 2), -(-w // 2)
        if step >= 3:
            sizes.append((h, w))
    return sizes


@lru_cache(maxsize=32)
def _anchors(size: tuple[int, int], layout: str, min_scale: float, max_scale: float, num_layers: int) -> Tensor:
    height, width = size
    if layout == "tf":
        # TF `MultipleGridAnchorGenerator` keeps anchors square in pixels on a non-square input by scaling its
        # base anchor size (1, 1) by min(h, w) / h and min(h, w) / w; torchvision applies no such correction.
        base_w, base_h = min(size) / width, min(size) / height
    else:
        base_w = base_h = 1.0
    per_layer = []
    layer_shapes = _layer_shapes(layout, num_layers, min_scale, max_scale)
    for (fh, fw), shapes in zip(feature_map_sizes(size, num_layers), layer_shapes):
        # Centres at ((j + 0.5) / W, (i + 0.5) / H): TF's default anchor stride 1/grid and offset half a stride.
        cy = (torch.arange(fh, dtype=torch.float32) + 0.5) / fh
        cx = (torch.arange(fw, dtype=torch.float32) + 0.5) / fw
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2).expand(-1, len(shapes), 2)
        wh = torch.tensor(shapes, dtype=torch.float32) * torch.tensor([base_w, base_h])
        per_layer.append(torch.cat((centres, wh.expand(fh * fw, -1, -1)), dim=-1).reshape(-1, 4))
    return torch.cat(per_layer)


def ssd_anchors(image_size: tuple[int, int] | int, layout: str = "tf", min_scale: float = 0.2,
                max_scale: float = 0.95, num_layers: int = NUM_LAYERS) -> Tensor:
    """Anchors [A, 4] as (cx, cy, w, h) normalised to the input, float32, not clipped (tf) or (w, h) clipped to 1
    (torchvision). A = 1917 at 300 and 2034 at 320 for tf. A fresh tensor each call (the cached one stays intact)."""
    _check(layout, num_layers)
    return _anchors(_pair(image_size), layout, float(min_scale), float(max_scale), num_layers).clone()
