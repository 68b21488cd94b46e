"""COCO detection metrics with pycocotools' own COCOeval (PAPER.md section 10): the twelve numbers of its summary.

Detections go to COCOeval exactly as a COCO results file holds them: [x, y, w, h] in original-image pixels, the
original category ids (COCO's 1..90, gaps included), one score each. Nothing is re-implemented here: our numbers are
COCOeval's, so they equal what anyone running pycocotools on our saved detections gets.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import UserError

# COCOeval.stats, in its order: AP@[.5:.95], AP@.5, AP@.75, AP small/medium/large, AR@1/10/100, AR small/medium/large.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(detections: Mapping[int, Mapping[str, torch.Tensor]], category_ids: Sequence[int]) -> list[dict]:
    """COCO results entries from {image_id: {"boxes": [K, 4] xyxy pixels, "scores": [K], "labels": [K] in 1..C}}.

    Label l is category_ids[l - 1]: the contiguous labels the model predicts go back to the file's own ids.
    """
    results = []
    for image_id, det in detections.items():
        boxes = det["boxes"].double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label) - 1]),
                            "bbox": [round(v, 3) for v in box], "score": round(float(score), 6)})
    return results


def coco_evaluate(coco_gt, results: list[dict], image_ids: Sequence[int] | None = None) -> tuple[dict, str]:
    """(metrics {name: fraction}, COCOeval's printed summary) of `results` against the pycocotools COCO `coco_gt`,
    over `image_ids` (default: every image of the ground truth). A metric with no ground truth in its area range is
    -1, as COCOeval reports it."""
    from pycocotools.cocoeval import COCOeval

    ids = sorted(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds()))
    if not results:  # loadRes rejects an empty list; no detection scores zero wherever there is ground truth
        zeros = {name: 0.0 for name in METRICS}
        return zeros, "no detections: every AP and AR is 0\n"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # pycocotools prints progress; keep only the summary
        dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, dt, "bbox")
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
    return {name: float(v) for name, v in zip(METRICS, evaluator.stats)}, summary.getvalue()


def save_results(path: str | Path, results: list[dict]) -> Path:
    """Write detections as a COCO results JSON file (atomically), readable by `COCO.loadRes`."""
    from ..weights import atomic_write_text

    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist")
    atomic_write_text(path, json.dumps(results))
    return path
