"""Centre/size box offsets relative to anchors (TF `faster_rcnn_box_coder`, scale factors 10, 10, 5, 5; paper 6.2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert

# torchvision's bound on dw, dh before exp: a box at most 1000/16 times its anchor, and exp never overflows.
DEFAULT_CLAMP = math.log(1000.0 / 16)
# A ground-truth box of zero width or height would give log(0) = -inf; TF adds an epsilon for the same reason.
_MIN_SIZE = 1e-8


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) offsets from anchors and decodes them back.

    dx = wx * (x - xa) / wa, dy = wy * (y - ya) / ha, dw = ww * log(w / wa), dh = wh * log(h / ha), with (x, y, w, h)
    the box centre and size, (xa, ya, wa, ha) the anchor's. Any leading dims broadcast; everything is float32.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 clamp: float = DEFAULT_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.clamp = clamp

    def encode(self, boxes_xyxy: Tensor, anchors_cxcywh: Tensor) -> Tensor:
        """Offsets [..., 4] of `boxes_xyxy` [..., 4] from `anchors_cxcywh` [..., 4]."""
        x, y, w, h = box_convert(boxes_xyxy.float(), "xyxy", "cxcywh").unbind(-1)
        xa, ya, wa, ha = anchors_cxcywh.float().unbind(-1)
        wx, wy, ww, wh = self.weights
        w, h = w.clamp(min=_MIN_SIZE), h.clamp(min=_MIN_SIZE)
        return torch.stack((wx * (x - xa) / wa, wy * (y - ya) / ha, ww * torch.log(w / wa), wh * torch.log(h / ha)),
                           dim=-1)

    def decode(self, deltas: Tensor, anchors_cxcywh: Tensor) -> Tensor:
        """Boxes [..., 4] xyxy from offsets `deltas` [..., 4] and `anchors_cxcywh` [..., 4]."""
        dx, dy, dw, dh = deltas.float().unbind(-1)
        xa, ya, wa, ha = anchors_cxcywh.float().unbind(-1)
        wx, wy, ww, wh = self.weights
        # Clamped after dividing by the weights, as torchvision's decode_single.
        dw, dh = (dw / ww).clamp(max=self.clamp), (dh / wh).clamp(max=self.clamp)
        boxes = torch.stack((dx / wx * wa + xa, dy / wy * ha + ya, torch.exp(dw) * wa, torch.exp(dh) * ha), dim=-1)
        return box_convert(boxes, "cxcywh", "xyxy")
