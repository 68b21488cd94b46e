"""SSD training targets and the multibox loss (paper 6.2; TF Object Detection API's ssdlite_mobilenet_v2_coco loss).

Lives outside the model (STYLE habit 2): the model returns logits and box offsets, the training code calls these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

from ..errors import UserError
from .box_coder import BoxCoder
from .matcher import IGNORED, match_anchors

KINDS = ("sigmoid", "softmax")
IGNORE_LABEL = -1


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"detection classification kind {kind!r} is not one of {', '.join(KINDS)}")


def encode_targets(targets: list[dict], anchors_cxcywh: Tensor, box_coder: BoxCoder,
                   iou_threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Per-anchor training targets for a batch.

    Returns labels LongTensor [N, A] (class 1..C for positives, 0 for negatives, -1 for ignored anchors) and
    box_targets [N, A, 4] (encoded offsets of the matched gt for positives, 0 elsewhere).
    """
    anchors = anchors_cxcywh.float()
    anchors_xyxy = box_convert(anchors, "cxcywh", "xyxy")
    # A dummy background gt appended at index G stands for "no gt": gathering through it needs no special case for
    # images without boxes, and its label 0 makes the negatives.
    dummy_box = anchors.new_tensor([[0.0, 0.0, 1.0, 1.0]])
    all_labels, all_boxes = [], []
    for target in targets:
        boxes = target["boxes"].to(anchors.device, torch.float32).reshape(-1, 4)
        labels = target["labels"].to(anchors.device, torch.long).reshape(-1)
        crowd = target.get("iscrowd")
        matches = match_anchors(boxes, anchors_xyxy, iou_threshold, None if crowd is None else crowd.reshape(-1))
        positive = matches >= 0
        index = torch.where(positive, matches, boxes.shape[0])
        anchor_labels = torch.cat((labels, labels.new_zeros(1)))[index]
        all_labels.append(torch.where(matches == IGNORED, IGNORE_LABEL, anchor_labels))
        encoded = box_coder.encode(torch.cat((boxes, dummy_box))[index], anchors)
        all_boxes.append(torch.where(positive[:, None], encoded, 0.0))
    return torch.stack(all_labels), torch.stack(all_boxes)


def classification_loss(cls_logits: Tensor, labels: Tensor, kind: str = "sigmoid") -> Tensor:
    """Per-anchor classification loss [N, A] in float32 (the values at ignored anchors are meaningless)."""
    check_kind(kind)
    logits = cls_logits.float()
    target = labels.clamp(min=0)
    if kind == "sigmoid":
        # TF's weighted_sigmoid: an independent BCE per column against the one-hot target, background column included.
        one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").sum(dim=-1)
    # torchvision's SSD: softmax cross-entropy over background + C classes.
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(labels)


def hard_negatives(cls_loss: Tensor, labels: Tensor, neg_pos_ratio: int = 3, min_negatives: int = 3) -> Tensor:
    """Bool [N, A]: per image, the max(neg_pos_ratio * positives, min_negatives) negatives with the highest loss.

    As TF's hard_example_miner (max_negatives_per_positive 3, min_negatives_per_image 3) without its box NMS: the
    easy background anchors would otherwise swamp the few positives. Ignored anchors (-1) are never picked.
    """
    negative = labels == 0
    num_pos = (labels > 0).sum(dim=1, keepdim=True)
    num_neg = (neg_pos_ratio * num_pos).clamp(min=min_negatives)
    loss = cls_loss.detach().masked_fill(~negative, float("-inf"))
    # Rank of each anchor's loss within its image (0 = highest), vectorised with two sorts; stable for ties.
    rank = loss.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return negative & (rank < num_neg)


def multibox_loss(cls_logits: Tensor, box_deltas: Tensor, labels: Tensor, box_targets: Tensor, kind: str = "sigmoid",
                  neg_pos_ratio: int = 3, min_negatives: int = 3) -> dict[str, Tensor]:
    """SSD loss: classification over positives and hard negatives + smooth L1 over positives, each summed over the
    batch and divided by max(1, positives in the batch) (TF's normalize_loss_by_num_matches). Float32 whatever the
    input dtype (bf16 autocast logits).

    Returns dict(loss=classification + localization, classification=..., localization=...) of scalars.
    """
    cls_loss = classification_loss(cls_logits, labels, kind)
    positive = labels > 0
    selected = positive | hard_negatives(cls_loss, labels, neg_pos_ratio, min_negatives)
    # torch.where (not a multiply) so a non-finite loss on an unselected anchor cannot leak in as NaN.
    classification = torch.where(selected, cls_loss, 0.0).sum()
    # Smooth L1 with beta 1 = TF's Huber loss with delta 1, summed over the 4 offsets.
    loc = F.smooth_l1_loss(box_deltas.float(), box_targets.float(), beta=1.0, reduction="none").sum(dim=-1)
    localization = torch.where(positive, loc, 0.0).sum()
    normaliser = positive.sum().clamp(min=1).float()
    classification, localization = classification / normaliser, localization / normaliser
    return {"loss": classification + localization, "classification": classification, "localization": localization}
