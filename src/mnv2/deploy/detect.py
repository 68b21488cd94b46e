"""`DetectionPredictor`: images in, boxes in original-image pixels with class names and scores out, and drawn.

The shared `Predictor` (load -> preprocess -> run on any backend -> postprocess) with a detector's last step. The
same preprocessing as evaluation (the whole image resized to the detector's square input, normalised -- in the
graph, on the ONNX backends; the settings travel with the weights) and the same post-processing function as
evaluation (mnv2.detection.select_detections: decode, per-class NMS, at most 100 boxes), so what `predict` shows is
what `eval` scores. On the torch backends it
runs on the model's two heads; an exported graph (mnv2.deploy.export_detection) runs it itself, and a --raw graph
gives the heads again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .export_detection import DetectorSpec, detection_onnx
from .preprocess import load_image
from .runtime import Predictor, build_backend, inspect_onnx, onnx_backend_name, onnx_runner


class Detection(NamedTuple):
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels
    score: float
    label: int  # 1..C, the model's contiguous label
    name: str
    category_id: int  # the dataset's own id (COCO's 1..90)


class DetectionPredictor(Predictor):
    """>>> p = DetectionPredictor.from_run("runs/det", backend="onnxruntime")
    >>> p.predict(["street.jpg"])[0][:2]   # [Detection(box=(12.0, 40.5, 96.2, 180.0), score=0.91, ...), ...]"""

    def __init__(self, backend, backend_name: str, spec: DetectorSpec, batch_size: int = 8,
                 fixed_batch: int | None = None):
        super().__init__(backend, backend_name, spec.preprocess, spec.class_names, batch_size, fixed_batch)
        self.spec = spec
        self.anchors = spec.anchors()

    # construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, config: dict, backend: str | None = None, threads: int | None = None,
                   batch_size: int = 8, calib_images: list | None = None,
                   graph: Callable[[bool], bytes] | None = None, nms_in_graph: bool = True) -> DetectionPredictor:
        """A predictor for a detector and its config (as stored with its weights); default backend torch-fast.

        The ONNX backends run the graph `mnv2 export` writes, at a static batch of one image: the dynamo exporter
        takes three times as long over a dynamic batch of SSDLite, and a static graph is the faster one to run.
        With nms_in_graph=False they run the network alone and the post-processing runs here, in PyTorch, as on the
        torch backends (the same function; its per-class NMS native when the extension is built)."""
        name = backend or "torch-fast"
        spec = DetectorSpec.from_config(config, model.num_classes)
        calibration = None
        if calib_images:
            from .quantize import CalibrationReader
            calibration = lambda: CalibrationReader.from_images(calib_images, spec.preprocess)
        # `graph(raw)`: the serialised batch-1 graph, for callers that build several ONNX backends from one export
        graph = graph or (lambda raw: detection_onnx(model, config, spec, dynamic_batch=False,
                                                     raw=raw).SerializeToString())
        runner = build_backend(name, model, spec.resolution, threads, calibration, lambda: graph(not nms_in_graph))
        static = name not in ("torch", "torch-fast", "torch-compile")
        return cls(runner, name, spec, batch_size, fixed_batch=1 if static else None)

    @classmethod
    def from_onnx(cls, path: str | Path, backend: str | None = None, threads: int | None = None,
                  batch_size: int = 8) -> DetectionPredictor:
        """A predictor for a detector .onnx file (with or without post-processing in the graph); everything else
        comes from its metadata_props."""
        proto, meta, (batch, height, width), num_classes = inspect_onnx(path)
        if meta.get("mnv2.task") != "detection":
            other = ("a segmentation model (SegmentationPredictor.from_onnx)" if meta.get("mnv2.task") == "segmentation"
                     else "a classifier (Predictor.from_onnx)")
            raise UserError(f"{path}: not a detector but {other}")
        spec = DetectorSpec.from_metadata(meta, num_classes, str(path))
        if spec.resolution not in (height, None) or spec.resolution not in (width, None):
            raise UserError(f"{path}: metadata says input {spec.resolution}x{spec.resolution} but the graph takes "
                            f"{height}x{width}")
        name = onnx_backend_name(path, meta, backend)
        return cls(onnx_runner(path, proto, name, threads), name, spec, batch_size, fixed_batch=batch)

    # the steps ---------------------------------------------------------------------------------------------------
    def load(self, images: Sequence) -> np.ndarray:
        """Images -> the backend's input: an exported graph's uint8 pixels [N, R, R, 3] (it normalises them
        itself), or the normalised float batch [N, 3, R, R] (the torch backends, graphs exported before the pixel
        input)."""
        if self.backend.input_dtype != np.uint8:
            return super().load(images)
        with self.beside_runtime():
            return self.spec.preprocess.pixels(list(images))

    def postprocess(self, outputs: list[np.ndarray], image_sizes: list[tuple[int, int]],
                    score_threshold: float | None = None) -> list[list[Detection]]:
        """The backend's outputs -- the two heads, or the graph's (boxes, scores, labels, count) -- to each image's
        detections scoring above `score_threshold` (default: the detector's own), in its pixels, best first.

        A higher threshold after NMS gives what NMS at that threshold gives: NMS keeps or drops a box by the boxes
        that score above it only."""
        if len(outputs) == 2:
            with self.beside_runtime():
                outputs = self.spec.select(*(torch.from_numpy(o) for o in outputs), self.anchors)
        boxes, scores, labels, count = (np.asarray(o) for o in outputs)
        threshold = self.spec.score_threshold if score_threshold is None else score_threshold
        results = []
        for i, (height, width) in enumerate(image_sizes):
            n = int(np.sum(scores[i, :int(count[i])] > threshold))  # best first: the kept ones lead
            scaled = boxes[i, :n] * np.array([width, height, width, height], np.float32)
            results.append([Detection(tuple(b), sc, lab, self.class_names[lab - 1], self.spec.category_ids[lab - 1])
                            for b, sc, lab in zip(scaled.tolist(), scores[i, :n].tolist(),
                                                  labels[i, :n].tolist())])
        return results

    def predict_images(self, images: Sequence, score_threshold: float | None = None) -> list[list[Detection]]:
        """Detections for PIL images (already loaded)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [load_image(im) for im in images[i:i + self.batch_size]]
            outputs = self.run_outputs(self.load(chunk))
            out += self.postprocess(outputs, [(im.height, im.width) for im in chunk], score_threshold)
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
