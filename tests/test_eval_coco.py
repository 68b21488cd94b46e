"""COCO metrics: pycocotools' own numbers, our results format, label <-> category id mapping."""

import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mnv2.eval.coco import METRICS, coco_evaluate, save_results, to_coco_results


def ground_truth(tmp_path):
    """Three images with boxes of three sizes (small < 32^2, medium, large > 96^2 pixels) and ids with gaps."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (3, 7, 11)]
    cats = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 90, "name": "c"}]
    boxes = [(3, 1, [10, 10, 20, 20]), (3, 5, [100, 100, 60, 50]), (7, 90, [50, 60, 200, 150]),
             (7, 1, [300, 200, 40, 40]), (11, 5, [0, 0, 639, 479])]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)), anns


def test_ground_truth_as_detections_scores_one(tmp_path):
    coco, anns = ground_truth(tmp_path)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in anns]
    metrics, summary = coco_evaluate(coco, results)
    assert set(metrics) == set(METRICS)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[name] == pytest.approx(1.0), (name, metrics)
    assert "Average Precision" in summary


def test_metrics_equal_cocoeval_run_directly(tmp_path):
    coco, anns = ground_truth(tmp_path)
    g = torch.Generator().manual_seed(0)
    results = []
    for a in anns:  # shifted boxes, some wrong classes, extra false positives
        x, y, w, h = a["bbox"]
        dx, dy = (torch.rand(2, generator=g) * 0.3 * torch.tensor([w, h])).tolist()
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + dx, y + dy, w, h],
                        "score": float(torch.rand(1, generator=g))})
        results.append({"image_id": a["image_id"], "category_id": 90, "bbox": [x, y, w * 0.5, h],
                        "score": float(torch.rand(1, generator=g))})
    ours, _ = coco_evaluate(coco, results)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert [ours[m] for m in METRICS] == pytest.approx(list(ev.stats), abs=0)
    assert 0 < ours["AP"] < 1


def test_results_use_original_category_ids_and_xywh(tmp_path):
    det = {7: {"boxes": torch.tensor([[50.0, 60.0, 250.0, 210.0]]), "scores": torch.tensor([0.8]),
               "labels": torch.tensor([3])}}
    (entry,) = to_coco_results(det, category_ids=[1, 5, 90])
    assert entry == {"image_id": 7, "category_id": 90, "bbox": [50.0, 60.0, 200.0, 150.0], "score": 0.8}
    path = save_results(tmp_path / "dets.json", [entry])
    assert json.loads(path.read_text()) == [entry]
    coco, _ = ground_truth(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(coco.loadRes(str(path)).getAnnIds()) == 1  # a valid COCO results file


def test_no_detections_scores_zero(tmp_path):
    coco, _ = ground_truth(tmp_path)
    metrics, summary = coco_evaluate(coco, [])
    assert all(v == 0.0 for v in metrics.values()) and "no detections" in summary
