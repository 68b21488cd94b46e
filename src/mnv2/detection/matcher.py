"""Anchor to ground-truth matching for SSD training (TF `ArgMaxMatcher` as in ssdlite_mobilenet_v2_coco, paper 6.2)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

NEGATIVE = -1
IGNORED = -2
# An anchor at least half covered by a crowd region is neither a positive nor a negative: the region may hold
# unannotated instances of its class, so calling it background would teach the model to miss them.
CROWD_COVER_THRESHOLD = 0.5


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection areas [len(a), len(b)] of xyxy boxes (torchvision exposes IoU but not this)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    return (bottom_right - top_left).clamp(min=0).prod(dim=-1)


def match_anchors(gt_boxes_xyxy: Tensor, anchors_xyxy: Tensor, iou_threshold: float = 0.5,
                  crowd: Tensor | None = None) -> Tensor:
    """Assign each anchor to a ground-truth box: LongTensor [A] with g >= 0 = matched to non-crowd gt g,
    -1 = negative (background), -2 = ignored.

    IoU >= `iou_threshold` with a non-crowd gt makes a positive (its highest-IoU gt); then every non-crowd gt is
    forced onto its best anchor (TF's force_match_for_each_row), so small or odd-shaped boxes are never left without
    a positive. Crowd gts never make positives; non-positive anchors covered >= 50 % by a crowd box are ignored.
    """
    gt = gt_boxes_xyxy.float()
    anchors = anchors_xyxy.float().to(gt.device)
    num_gt, num_anchors = gt.shape[0], anchors.shape[0]
    matches = torch.full((num_anchors,), NEGATIVE, dtype=torch.long, device=gt.device)
    if num_gt == 0:
        # Images without boxes train as pure background.
        return matches
    crowd = torch.zeros(num_gt, dtype=torch.bool, device=gt.device) if crowd is None else crowd.to(gt.device, bool)

    # Crowd rows get IoU -1: below any threshold and never any anchor's best gt.
    iou = box_iou(gt, anchors).masked_fill(crowd[:, None], -1.0)
    best_iou, best_gt = iou.max(dim=0)
    matches = torch.where(best_iou >= iou_threshold, best_gt, matches)

    # Force match. TF takes tf.argmax over the one-hot rows, i.e. the first (lowest-index) gt when two gts share a
    # best anchor; scatter_reduce("amin") gives that deterministically (plain index assignment would not be).
    gt_index = torch.arange(num_gt, device=gt.device)
    best_anchor = iou.argmax(dim=1)
    forced = torch.full((num_anchors,), num_gt, dtype=torch.long, device=gt.device)
    forced.scatter_reduce_(0, best_anchor, torch.where(crowd, num_gt, gt_index), reduce="amin")
    matches = torch.where(forced < num_gt, forced, matches)

    # Intersection over the anchor's own area: a small anchor wholly inside a large crowd region has a low IoU with it.
    cover = (_intersection(gt, anchors) / box_area(anchors).clamp(min=1e-12)).masked_fill(~crowd[:, None], 0.0)
    in_crowd = (cover >= CROWD_COVER_THRESHOLD).any(dim=0)
    return torch.where(in_crowd & (matches < 0), IGNORED, matches)
