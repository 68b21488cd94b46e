"""`DetectionPredictor`: images in, boxes in original-image pixels with class names and scores out, and drawn.

The same preprocessing as evaluation (the whole image resized to the detector's square input, normalised; the
settings travel with the weights) and the same post-processing function as evaluation (mnv2.detection.postprocess:
decode, per-class NMS, at most 100 boxes), so what `predict` shows is what `eval` scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import UserError
from .preprocess import load_image

DETECTION_BACKENDS = ("torch", "torch-fast")


class Detection(NamedTuple):
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels
    score: float
    label: int  # 1..C, the model's contiguous label
    name: str
    category_id: int  # the dataset's own id (COCO's 1..90)


class DetectionPredictor:
    """>>> p = DetectionPredictor.from_run("runs/det")
    >>> p.predict(["street.jpg"])[0][:2]   # [Detection(box=(12.0, 40.5, 96.2, 180.0), score=0.91, ...), ...]"""

    def __init__(self, model: nn.Module, config: dict, backend: str = "torch", threads: int | None = None,
                 batch_size: int = 8):
        from ..data.detection_transforms import detection_eval_preset
        from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from ..detection import ssd_anchors
        from .fold import fold_bn

        if backend not in DETECTION_BACKENDS:
            raise UserError(f"backend {backend!r} does not serve detectors yet; use one of "
                            f"{', '.join(DETECTION_BACKENDS)}")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if threads is not None:
            torch.set_num_threads(threads)
        pre, self.post = config.get("preprocess") or {}, dict(config.get("postprocess") or {})
        if "resolution" not in pre:
            raise UserError("detector weights carry no input resolution in their 'preprocess' settings")
        self.size = int(pre["resolution"])
        self.transform = detection_eval_preset(self.size, pre.get("mean", IMAGENET_MEAN), pre.get("std", IMAGENET_STD))
        self.anchors = ssd_anchors(self.size, layout=self.post.get("anchor_layout", "tf"))
        model = model.eval()
        self.model = fold_bn(model).to(memory_format=torch.channels_last) if backend == "torch-fast" else model
        self.backend_name, self.batch_size = backend, batch_size
        self.class_names = list(config.get("class_names") or [f"class_{i}" for i in range(1, model.num_classes + 1)])
        self.category_ids = list(config.get("category_ids") or range(1, model.num_classes + 1))

    @classmethod
    def from_weights(cls, path: str | Path, **kwargs) -> DetectionPredictor:
        from .export import load_source
        return cls(*load_source(weights=path), **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> DetectionPredictor:
        from .export import load_source
        return cls(*load_source(run=run_dir), **kwargs)

    @torch.inference_mode()
    def predict_images(self, images: Sequence, score_threshold: float | None = None) -> list[list[Detection]]:
        """Detections for PIL images (already loaded)."""
        from ..detection import postprocess

        threshold = self.post.get("score_threshold", 1e-8) if score_threshold is None else score_threshold
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            batch = torch.stack([self.transform(_to_tensor(im)) for im in chunk])
            cls_logits, box_deltas = self.model(batch.contiguous(memory_format=torch.channels_last))
            dets = postprocess(cls_logits.float(), box_deltas.float(), self.anchors,
                               [(im.height, im.width) for im in chunk], kind=self.post.get("kind", "sigmoid"),
                               score_threshold=threshold, iou_threshold=self.post.get("iou_threshold", 0.6),
                               max_detections=self.post.get("max_detections", 100))
            out += [[Detection(tuple(float(v) for v in b), float(s), int(lab), self.class_names[int(lab) - 1],
                               int(self.category_ids[int(lab) - 1]))
                     for b, s, lab in zip(d["boxes"], d["scores"], d["labels"])] for d in dets]
        return out

    def predict(self, images: Sequence, score_threshold: float | None = None) -> list[list[Detection]]:
        """Detections for image files or PIL images, sorted by score."""
        return self.predict_images([load_image(im) for im in images], score_threshold)


def _to_tensor(image) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F
    return F.pil_to_tensor(image)


def draw_detections(image, detections: Sequence[Detection], path: str | Path) -> Path:
    """The image with its boxes, class names and scores drawn (torchvision.utils.draw_bounding_boxes), written
    atomically to `path` (format from its suffix)."""
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes

    from ..atomic import atomic_path

    pixels = _to_tensor(load_image(image))
    if detections:
        boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
        labels = [f"{d.name} {d.score:.2f}" for d in detections]
        palette = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                   "#bcf60c", "#fabebe", "#008080", "#e6beff"]
        colors = [palette[(d.label - 1) % len(palette)] for d in detections]
        pixels = draw_bounding_boxes(pixels, boxes, labels=labels, colors=colors, width=2)
    path = Path(path)
    with atomic_path(path) as tmp:
        F.to_pil_image(pixels).save(tmp, format=_format(path))
    return path


def _format(path: Path) -> str:
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: drawings are written as .png or .jpg")
    return fmt
