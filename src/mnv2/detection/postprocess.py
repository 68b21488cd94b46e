"""Detections from SSD outputs: scores, decoding, per-class NMS (paper 6.2; TF's batch_non_max_suppression settings).

The one post-processing function for eval, predict and export (STYLE habit 7).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from .box_coder import BoxCoder
from .loss import check_kind


def postprocess(cls_logits: Tensor, box_deltas: Tensor, anchors_cxcywh: Tensor, image_sizes: list[tuple[int, int]],
                kind: str = "sigmoid", score_threshold: float = 1e-8, iou_threshold: float = 0.6,
                max_detections: int = 100, candidates_per_class: int = 100,
                box_coder: BoxCoder | None = None) -> list[dict[str, Tensor]]:
    """Per image: dict(boxes [K, 4] xyxy in original-image pixels, scores [K], labels [K] long in 1..C), K <=
    `max_detections`, sorted by score descending.

    Args:
        cls_logits: [N, A, C + 1], column 0 background. box_deltas: [N, A, 4]. anchors_cxcywh: [A, 4] normalised.
        image_sizes: (height, width) of each ORIGINAL image, to scale the normalised boxes to its pixels.
        kind: "sigmoid" (TF) or "softmax" (torchvision) scores; the background column is dropped either way.
        score_threshold: keep scores above it; TF evaluates COCO at 1e-8 (paper 6.2's mAP needs a very low one).
        iou_threshold: per-class NMS IoU (TF config: 0.6). candidates_per_class: top-k per class before NMS.
    """
    check_kind(kind)
    if len(image_sizes) != cls_logits.shape[0]:
        raise ValueError(f"postprocess: {len(image_sizes)} image sizes for a batch of {cls_logits.shape[0]}")
    box_coder = box_coder or BoxCoder()
    logits = cls_logits.float()
    probs = logits.sigmoid() if kind == "sigmoid" else logits.softmax(dim=-1)
    scores = probs[..., 1:]
    num_anchors, num_classes = scores.shape[1], scores.shape[2]
    anchors = anchors_cxcywh.to(logits.device, torch.float32)
    # Decode and clip in the normalised input frame, where NMS runs as in TF (clip_window [0, 0, 1, 1]) and
    # torchvision (clipped to the square network input): IoU there is IoU in network-input pixels.
    boxes = clip_boxes_to_image(box_coder.decode(box_deltas, anchors), (1, 1))
    # Static-shaped candidate selection (top-k per class, then a threshold mask) keeps the graph export-friendly.
    k = min(candidates_per_class, num_anchors)
    class_labels = torch.arange(1, num_classes + 1, device=logits.device).expand(k, num_classes).reshape(-1)

    results = []
    for i, (height, width) in enumerate(image_sizes):
        top_scores, top_anchors = scores[i].topk(k, dim=0)  # [k, C]: each class's best k anchors
        top_scores, top_anchors = top_scores.reshape(-1), top_anchors.reshape(-1)
        keep = top_scores > score_threshold
        cand_scores, cand_labels = top_scores[keep], class_labels[keep]
        cand_boxes = boxes[i, top_anchors[keep]]
        kept = batched_nms(cand_boxes, cand_scores, cand_labels, iou_threshold)[:max_detections]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=logits.device)
        results.append({"boxes": cand_boxes[kept] * scale, "scores": cand_scores[kept], "labels": cand_labels[kept]})
    return results
