"""Segmentation metrics: the confusion matrix and mIoU against a direct count, MF inference."""

import math

import numpy as np
import pytest
import torch

from mnv2.eval.segmentation import confusion_matrix, predict_probabilities, segmentation_metrics


def _direct_iou(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict[int, float]:
    """IoU per class by set arithmetic on the pixels, 255 left out."""
    keep = target != 255
    out = {}
    for c in range(num_classes):
        p, t = (pred == c) & keep, (target == c) & keep
        union = (p | t).sum()
        if union:
            out[c] = (p & t).sum() / union
    return out


def test_miou_equals_direct_computation_on_known_masks():
    rng = np.random.default_rng(0)
    num_classes = 5
    images = [(rng.integers(0, num_classes, (7, 9)), rng.integers(0, num_classes, (7, 9))) for _ in range(3)]
    images[0][1][0, :4] = 255  # ignored pixels
    images[1][0][images[1][0] == 4] = 0  # class 4 never predicted in image 1
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), num_classes) for p, t in images)
    metrics = segmentation_metrics(cm, [f"c{i}" for i in range(num_classes)])
    pred = np.concatenate([p.ravel() for p, _ in images])
    target = np.concatenate([t.ravel() for _, t in images])
    direct = _direct_iou(pred, target, num_classes)
    assert metrics["mIoU"] == pytest.approx(np.mean(list(direct.values())))
    for c, iou in direct.items():
        assert metrics["per_class"][f"c{c}"] == pytest.approx(iou)
    keep = target != 255
    assert metrics["pixel_acc"] == pytest.approx((pred[keep] == target[keep]).mean())
    assert metrics["pixels"] == keep.sum()


def test_absent_class_has_no_iou_and_is_left_out_of_the_mean():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 1, 0]])
    metrics = segmentation_metrics(confusion_matrix(pred, target, 3), ["bg", "a", "b"])
    assert metrics["per_class"]["b"] is None
    assert metrics["mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_label_outside_the_classes_is_an_error():
    with pytest.raises(ValueError, match="label 7"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), 3)


class _Conv(torch.nn.Module):
    """A small fully convolutional 'segmenter' whose output depends on position (so flips matter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 5, padding=2)

    def forward(self, x):
        return self.conv(x) + torch.linspace(0, 1, x.shape[-1])


def test_mf_with_one_scale_and_no_flip_is_single_scale():
    model, x = _Conv(), torch.randn(2, 3, 20, 24)
    probs = predict_probabilities(model, x, scales=(1.0,), flip=False)
    assert torch.allclose(probs, model(x).softmax(1))


def test_mf_averages_scales_and_flips():
    model, x = _Conv(), torch.randn(1, 3, 20, 24)
    f = torch.nn.functional
    expected = 0
    for s in (0.5, 1.5):
        xs = f.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = model(xs.flip(-1)).flip(-1) if flip else model(xs)
            expected = expected + f.interpolate(logits, size=(20, 24), mode="bilinear",
                                                align_corners=False).softmax(1)
    got = predict_probabilities(model, x, scales=(0.5, 1.5), flip=True)
    assert torch.allclose(got, expected / 4, atol=1e-6)
    assert math.isclose(float(got.detach().sum(1).mean()), 1.0, rel_tol=1e-5)
