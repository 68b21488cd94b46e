"""Semantic segmentation metrics (PAPER.md section 10): one confusion matrix over the whole split, IoU per class,
mean IoU, pixel accuracy; and the multi-scale + flip ("MF") inference of Table 7.

The matrix is [true, predicted] over every labelled pixel of every image at its full resolution (label 255 is
ignored). Summing matrices is exact, so shards and ranks combine by addition. A class that appears neither in the
labels nor in the predictions has no IoU (NaN) and is left out of the mean, as TF's streaming mean IoU does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

IGNORE_INDEX = 255
# The MF setting of TF DeepLab's evaluation (PAPER.md section 9): scales 0.5 to 1.75 in steps of 0.25, + flip.
MF_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts of (true, predicted) over the pixels whose label is not ignored."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and int(t.max()) >= num_classes:
        raise ValueError(f"label {int(t.max())} is outside 0..{num_classes - 1} (and not {ignore_index})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """{"mIoU", "pixel_acc", "per_class": {name: IoU or None}, "pixels"} from a summed confusion matrix."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = tp / union  # NaN where the class is absent from labels and predictions
    present = union > 0
    total = cm.sum()
    names = list(class_names) if class_names is not None else [str(i) for i in range(cm.shape[0])]
    return {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class": {n: (float(v) if ok else None) for n, v, ok in zip(names, iou, present)},
        "pixels": int(total),
    }


def predict_probabilities(model, images: torch.Tensor, scales: Sequence[float] = (1.0,),
                          flip: bool = False) -> torch.Tensor:
    """Class probabilities [N, C, H, W] at the input's size, averaged over `scales` and (with `flip`) left-right
    flips: each scaled input is resized bilinearly, its logits resized back to H x W before the softmax."""
    h, w = images.shape[-2:]
    total = None
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, size=(max(1, round(h * s)), max(1, round(w * s))),
                                                  mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = model(x.flip(-1) if flipped else x).float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))
