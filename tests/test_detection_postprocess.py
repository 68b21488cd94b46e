import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import batched_nms, box_convert

from mnv2.detection import postprocess, ssd_anchors


def reference_postprocess(logits, deltas, anchors, image_size, kind, score_threshold, iou_threshold, max_detections,
                          candidates_per_class):
    """One image, written out: torchvision's decoding, clip to the input, per class threshold + top-k, batched NMS."""
    anchors_xyxy = box_convert(anchors, "cxcywh", "xyxy")
    boxes = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, anchors_xyxy).clamp(0.0, 1.0)
    probs = logits.sigmoid() if kind == "sigmoid" else logits.softmax(dim=-1)
    all_boxes, all_scores, all_labels = [], [], []
    for label in range(1, logits.shape[-1]):
        scores = probs[:, label]
        index = torch.nonzero(scores > score_threshold).flatten()
        index = index[scores[index].argsort(descending=True)][:candidates_per_class]
        all_boxes.append(boxes[index])
        all_scores.append(scores[index])
        all_labels.append(torch.full((len(index),), label))
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
    height, width = image_size
    return boxes[keep] * torch.tensor([width, height, width, height]), scores[keep], labels[keep]


@pytest.mark.parametrize("native", [True, False], ids=["native-nms", "torchvision-nms-per-row"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_equals_batched_nms_written_out(kind, native, monkeypatch):
    from mnv2 import native as native_kernels
    if native and not native_kernels.available():
        pytest.skip(f"native kernels unavailable: {native_kernels.status()}")
    if not native:  # the path where the kernels cannot be built: one torchvision.ops.nms per row
        monkeypatch.setattr(native_kernels, "_state", {"ok": False, "why": "turned off by the test"})
    g = torch.Generator().manual_seed(0)
    anchors = ssd_anchors(128)  # 330 anchors
    logits = torch.randn(2, len(anchors), 4, generator=g) * 2
    deltas = torch.randn(2, len(anchors), 4, generator=g) * 0.5
    sizes = [(480, 640), (300, 200)]
    settings = {"score_threshold": 0.3, "iou_threshold": 0.45, "max_detections": 25, "candidates_per_class": 30}
    if kind == "softmax":
        settings["score_threshold"] = 0.2
    results = postprocess(logits, deltas, anchors, sizes, kind=kind, **settings)
    assert len(results) == 2
    for i, result in enumerate(results):
        boxes, scores, labels = reference_postprocess(logits[i], deltas[i], anchors, sizes[i], kind, **settings)
        assert 0 < len(scores) <= 25
        torch.testing.assert_close(result["scores"], scores)
        assert result["labels"].tolist() == labels.tolist()
        torch.testing.assert_close(result["boxes"], boxes)
        assert result["labels"].dtype == torch.long and result["boxes"].dtype == torch.float32


def one_hot_logits(scores_per_anchor, num_columns=3):
    """Logits whose sigmoid is `score` in column `label` and ~0 elsewhere, per anchor (label, score)."""
    logits = torch.full((1, len(scores_per_anchor), num_columns), -30.0)
    for a, (label, score) in enumerate(scores_per_anchor):
        logits[0, a, label] = torch.logit(torch.tensor(score))
    return logits


def test_boxes_in_original_pixels_of_a_non_square_image():
    # Zero offsets decode to the anchors themselves; the second one sticks out of the image and is clipped.
    anchors = torch.tensor([[0.5, 0.5, 0.25, 0.5], [0.9, 0.1, 0.4, 0.4]])
    out = postprocess(one_hot_logits([(1, 0.9), (2, 0.8)]), torch.zeros(1, 2, 4), anchors, [(200, 400)])[0]
    expected = torch.tensor([[150.0, 50.0, 250.0, 150.0], [280.0, 0.0, 400.0, 60.0]])
    torch.testing.assert_close(out["boxes"], expected)
    assert out["labels"].tolist() == [1, 2]
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8]))


def test_at_most_max_detections_best_first():
    # 64 disjoint tiles on an 8 x 8 grid, all confident: NMS removes none, the cap keeps the 10 best.
    centres = (torch.arange(8) + 0.5) / 8
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    anchors = torch.stack((cx.flatten(), cy.flatten(), torch.full((64,), 0.1), torch.full((64,), 0.1)), dim=1)
    scores = torch.linspace(0.3, 0.95, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    logits = one_hot_logits([(1, s.item()) for s in scores], num_columns=2)
    out = postprocess(logits, torch.zeros(1, 64, 4), anchors, [(100, 100)], max_detections=10)[0]
    assert len(out["scores"]) == 10
    torch.testing.assert_close(out["scores"], scores.sort(descending=True).values[:10])
    everything = postprocess(logits, torch.zeros(1, 64, 4), anchors, [(100, 100)], max_detections=100)[0]
    assert len(everything["scores"]) == 64


def test_score_threshold_and_candidates_per_class():
    anchors = torch.tensor([[0.125 + 0.25 * i, 0.5, 0.2, 0.2] for i in range(4)])
    logits = one_hot_logits([(1, 0.9), (1, 0.4), (2, 0.6), (2, 0.2)])
    out = postprocess(logits, torch.zeros(1, 4, 4), anchors, [(10, 10)], score_threshold=0.5)[0]
    assert out["labels"].tolist() == [1, 2]
    assert (out["scores"] > 0.5).all()
    # One candidate per class: class 1 keeps only its 0.9, class 2 only its 0.6.
    out = postprocess(logits, torch.zeros(1, 4, 4), anchors, [(10, 10)], candidates_per_class=1)[0]
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.6]))


def test_overlapping_boxes_of_one_class_are_suppressed_not_across_classes():
    anchors = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]])
    logits = one_hot_logits([(1, 0.9), (1, 0.8), (2, 0.7)])
    out = postprocess(logits, torch.zeros(1, 3, 4), anchors, [(100, 100)])[0]
    assert out["labels"].tolist() == [1, 2]


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_nothing_above_threshold_gives_empty_tensors(kind):
    anchors = ssd_anchors(128)
    logits = torch.full((1, len(anchors), 4), -40.0)
    if kind == "softmax":
        logits[..., 0] = 40.0  # all background
    out = postprocess(logits, torch.zeros(1, len(anchors), 4), anchors, [(240, 320)], kind=kind)[0]
    assert out["boxes"].shape == (0, 4) and out["boxes"].dtype == torch.float32
    assert out["scores"].shape == (0,) and out["scores"].dtype == torch.float32
    assert out["labels"].shape == (0,) and out["labels"].dtype == torch.long


def test_bf16_logits_give_the_float32_result():
    g = torch.Generator().manual_seed(3)
    anchors = ssd_anchors(128)
    logits = torch.randn(1, len(anchors), 3, generator=g).bfloat16()
    deltas = torch.randn(1, len(anchors), 4, generator=g).bfloat16()
    out = postprocess(logits, deltas, anchors, [(128, 128)])[0]
    reference = postprocess(logits.float(), deltas.float(), anchors, [(128, 128)])[0]
    assert out["scores"].dtype == torch.float32 and out["boxes"].dtype == torch.float32
    torch.testing.assert_close(out["scores"], reference["scores"])
    torch.testing.assert_close(out["boxes"], reference["boxes"])
