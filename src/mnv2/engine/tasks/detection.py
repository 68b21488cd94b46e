"""Object detection with SSDLite on COCO-format data (paper section 6.2): multibox loss, COCO AP with pycocotools.

Batches are (images [N, 3, S, S], list of per-image target dicts): images go to the device, targets stay on the CPU,
where the anchors are matched (a [G, A] IoU per image, cheap beside the network). Evaluation decodes and NMSes each
image's detections back to its original pixels, gathers them from every rank on rank 0, and scores them with COCOeval.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..config import Config
from . import build_task_model

DETECTORS = ("ssdlite_mobilenet_v2",)


class DetectionTask:
    name = "detection"
    best_metric = "AP"

    def __init__(self, cfg: Config, data_root: Path):
        self.cfg, self.root = cfg, Path(data_root)
        self.class_names: list[str] = []
        self.category_ids: list[int] = []
        self._anchors = None

    # ---- data ---------------------------------------------------------------------------------------------------
    def split_files(self, split: str) -> tuple[Path, Path]:
        from ...data.coco import find_coco_split

        d = self.cfg.data
        if split == "train":
            return find_coco_split(self.root, d.train_split, d.train_images, d.train_annotations)
        return find_coco_split(self.root, d.val_split, d.val_images, d.val_annotations)

    def datasets(self):
        from ...data.coco import CocoDetection
        from ...data.detection_transforms import detection_train_preset

        d = self.cfg.data
        train_tf = detection_train_preset(d.resolution, d.mean, d.std, hflip=d.hflip, zoom_out=d.zoom_out,
                                          iou_crop=d.iou_crop, photometric=d.photometric, rot90=d.rot90)
        train = CocoDetection(*self.split_files("train"), transform=train_tf, on_bad_image=d.on_bad_image)
        self.class_names, self.category_ids = list(train.class_names), list(train.category_ids)
        return train, self.val_dataset(train)

    def val_dataset(self, category_ids=None):
        """The evaluation split with the eval transform; `category_ids` fixes the label mapping: the training
        dataset's (named in errors), or the ids stored with the weights."""
        from ...data.coco import CocoDetection

        d = self.cfg.data
        val = CocoDetection(*self.split_files("val"), transform=self.eval_transform(), on_bad_image=d.on_bad_image,
                            category_ids=category_ids)
        if not self.class_names:
            self.class_names, self.category_ids = list(val.class_names), list(val.category_ids)
        return val

    def eval_transform(self):
        from ...data.detection_transforms import detection_eval_preset

        d = self.cfg.data
        return detection_eval_preset(d.resolution, d.mean, d.std)

    def collate(self, samples: list):
        from ...data.detection_transforms import detection_collate

        return detection_collate(samples)

    def to_device(self, batch, device: torch.device, memory_format: torch.memory_format):
        images, targets = batch
        return images.to(device, non_blocking=True).contiguous(memory_format=memory_format), targets

    def batch_size(self, batch) -> int:
        return batch[0].shape[0]

    # ---- model --------------------------------------------------------------------------------------------------
    def model_spec(self) -> tuple[str, dict]:
        m = self.cfg.model
        return m.name, {"width_mult": m.width, "num_classes": len(self.class_names),
                      "image_size": self.cfg.data.resolution, **m.kwargs}

    def build_model(self) -> nn.Module:
        return build_task_model(self, DETECTORS, "a detector")

    @property
    def anchors(self) -> torch.Tensor:
        from ...detection import ssd_anchors

        if self._anchors is None:
            layout = self.cfg.model.kwargs.get("anchor_layout", "tf")
            self._anchors = ssd_anchors(self.cfg.data.resolution, layout=layout)
        return self._anchors

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        from ...detection import BoxCoder, encode_targets, multibox_loss

        images, targets = batch
        cls_logits, box_deltas = model(images)
        det = self.cfg.detection
        labels, box_targets = encode_targets(targets, self.anchors, BoxCoder(), iou_threshold=det.match_iou)
        out = multibox_loss(cls_logits, box_deltas, labels.to(cls_logits.device), box_targets.to(cls_logits.device),
                            kind=det.loss, neg_pos_ratio=det.neg_pos_ratio, min_negatives=det.min_negatives)
        return out["loss"]

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluator(self, val_dataset) -> DetectionEvaluator:
        return DetectionEvaluator(val_dataset, self.anchors, self.cfg.detection)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return f"AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f} AR100 {metrics['AR100']:.3f}"

    def preprocess(self) -> dict:
        d = self.cfg.data
        # SSD resizes the whole image to a square (TF's fixed_shape_resizer): no crop, aspect not kept.
        return {"mean": list(d.mean), "std": list(d.std), "resolution": d.resolution, "resize": "stretch",
                "interpolation": "bilinear"}

    def postprocess_config(self) -> dict:
        det = self.cfg.detection
        return {"kind": det.loss, "score_threshold": det.score_threshold, "iou_threshold": det.nms_iou,
                "max_detections": det.max_detections,
                "anchor_layout": self.cfg.model.kwargs.get("anchor_layout", "tf")}

    def save_weights(self, path: Path, model: nn.Module, **meta) -> None:
        from ...weights import save_model

        name, kwargs = self.model_spec()
        save_model(path, model, name, kwargs, task=self.name, preprocess=self.preprocess(),
                   class_names=self.class_names, category_ids=self.category_ids,
                   postprocess=self.postprocess_config(), **meta)


class DetectionEvaluator:
    """Collects each image's post-processed detections (original pixels); `compute` scores them with COCOeval on
    rank 0 over the whole split and hands the metrics to every rank. `results` keeps the COCO results entries."""

    def __init__(self, dataset, anchors: torch.Tensor, det_cfg):
        self.dataset, self.anchors, self.cfg = dataset, anchors, det_cfg
        self.detections: dict[int, dict] = {}
        self.results: list[dict] = []
        self.summary = ""

    def update(self, model: nn.Module, batch) -> None:
        from ...detection import postprocess

        images, targets = batch
        cls_logits, box_deltas = model(images)
        out = postprocess(cls_logits.float().cpu(), box_deltas.float().cpu(), self.anchors,
                          [t["orig_size"] for t in targets], kind=self.cfg.loss,
                          score_threshold=self.cfg.score_threshold, iou_threshold=self.cfg.nms_iou,
                          max_detections=self.cfg.max_detections)
        for target, det in zip(targets, out):
            self.detections[int(target["image_id"])] = det

    def compute(self, ctx: distributed.Dist) -> dict[str, float]:
        from ...eval.coco import coco_evaluate, to_coco_results

        parts = distributed.gather_objects(self.detections, ctx)
        metrics = None
        if ctx.is_main:
            merged = {k: v for part in parts for k, v in part.items()}
            self.results = to_coco_results(merged, self.dataset.category_ids)
            metrics, self.summary = coco_evaluate(self.dataset.coco, self.results, self.dataset.image_ids)
            metrics["images"] = len(merged)
        return distributed.broadcast_object(metrics, ctx)
