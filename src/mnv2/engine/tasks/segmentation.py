"""Semantic segmentation with Mobile DeepLabv3 on PASCAL VOC (+ SBD) or any index-mask data (paper section 6.3).

Batches are (images [N, 3, H, W], masks [N, H, W] with 255 = ignore, original sizes). Training batches are crops of
one size; evaluation images keep their full resolution and are padded to the batch's largest (the pad is ignored by
the mask and cut off the prediction). Evaluation sums one confusion matrix over the split, then over ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ...eval.segmentation import IGNORE_INDEX, confusion_matrix, predict_probabilities, segmentation_metrics
from .. import distributed
from ..config import Config
from . import build_task_model

SEGMENTERS = ("deeplabv3_mobilenet_v2", "deeplabv3_mobilenet_v1")


class SegmentationTask:
    name = "segmentation"
    best_metric = "mIoU"

    def __init__(self, cfg: Config, data_root: Path):
        self.cfg, self.root = cfg, Path(data_root)
        self.class_names: list[str] = []
        self.eval_scales: tuple[float, ...] = (1.0,)  # `mnv2 eval --scales ... --flip`: the paper's MF evaluation
        self.eval_flip = False

    # ---- data ---------------------------------------------------------------------------------------------------
    def samples(self, split: str) -> list:
        """The (image, mask) pairs of "train" or "val": the folders given with --set, else the VOC (+ SBD) split."""
        from ...data.voc import find_voc, folder_samples, segmentation_samples

        d = self.cfg.data
        images, masks, listed = ((d.train_images, d.train_annotations, d.train_list) if split == "train" else
                                 (d.val_images, d.val_annotations, d.val_list))
        if images or masks:
            if not (images and masks):
                raise UserError(f"data.{split}_images and data.{split}_annotations (the mask folder) go together")
            return folder_samples(images, masks, listed)
        return segmentation_samples(find_voc(self.root), d.train_split if split == "train" else d.val_split)

    def find_class_names(self) -> list[str]:
        """VOC's 21 names, or a `labels.txt` (background first): in the VOC root, or for mask folders given with
        --set, in the training mask folder or its parent."""
        from ...data.voc import class_names_in, find_voc

        folder = self.cfg.data.train_annotations or self.cfg.data.val_annotations
        if folder:
            folder = Path(folder)
            return list(class_names_in(folder if (folder / "labels.txt").is_file() else folder.parent))
        return list(find_voc(self.root).class_names)

    def datasets(self):
        from ...data.segmentation_transforms import segmentation_train_preset
        from ...data.voc import SegmentationDataset

        d = self.cfg.data
        samples = self.samples("train")
        self.class_names = self.find_class_names()
        train_tf = segmentation_train_preset(d.resolution, d.mean, d.std, scale=d.rescale,
                                             hflip=d.hflip > 0, ignore_index=IGNORE_INDEX)
        train = SegmentationDataset(samples, self.class_names, transform=train_tf, on_bad_image=d.on_bad_image)
        return train, self.val_dataset()

    def val_dataset(self):
        from ...data.voc import SegmentationDataset

        samples = self.samples("val")
        if not self.class_names:
            self.class_names = self.find_class_names()
        return SegmentationDataset(samples, self.class_names, transform=self.eval_transform(),
                                   on_bad_image=self.cfg.data.on_bad_image)

    def eval_transform(self):
        from ...data.segmentation_transforms import segmentation_eval_preset

        return segmentation_eval_preset(self.cfg.data.mean, self.cfg.data.std)

    def collate(self, samples: list):
        from ...data.segmentation_transforms import segmentation_collate

        return segmentation_collate(samples, ignore_index=IGNORE_INDEX)

    def to_device(self, batch, device: torch.device, memory_format: torch.memory_format):
        images, masks, sizes = batch
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        return images, masks.to(device, non_blocking=True), sizes

    def batch_size(self, batch) -> int:
        return batch[0].shape[0]

    # ---- model --------------------------------------------------------------------------------------------------
    def model_spec(self) -> tuple[str, dict]:
        m = self.cfg.model
        return m.name, {"width_mult": m.width, "num_classes": len(self.class_names), "dropout": m.dropout,
                        **m.kwargs}

    def build_model(self) -> nn.Module:
        return build_task_model(self, SEGMENTERS, "a segmentation model")

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, masks, _ = batch
        logits = model(images)
        # per pixel, as a classifier's per image; pixels marked IGNORE_INDEX (VOC's object borders) count for nothing
        return nn.functional.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX,
                                           label_smoothing=self.cfg.train.label_smoothing)

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluator(self, val_dataset) -> SegmentationEvaluator:
        return SegmentationEvaluator(self.class_names, self.eval_scales, self.eval_flip)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return f"mIoU {metrics['mIoU']:.3f} pixel acc {metrics['pixel_acc']:.3f}"

    def preprocess(self) -> dict:
        d = self.cfg.data
        # The network is fully convolutional: it runs at the image's own size (resolution = the training crop).
        return {"mean": list(d.mean), "std": list(d.std), "resolution": d.resolution, "resize": "none",
                "interpolation": "bilinear"}

    def save_weights(self, path: Path, model: nn.Module, **meta) -> None:
        from ...weights import save_model

        name, kwargs = self.model_spec()
        save_model(path, model, name, kwargs, task=self.name, preprocess=self.preprocess(),
                   class_names=self.class_names, **meta)


class SegmentationEvaluator:
    """Sums the [true, predicted] confusion matrix over images at their full size; one all-reduce adds the ranks.

    A batch whose images differ in size was padded to the largest: those images run one at a time on their own
    pixels, so the result never depends on which images share a batch (the image-pooling branch averages the whole
    input). `scales` / `flip`: the MF evaluation (probabilities averaged)."""

    def __init__(self, class_names: Sequence[str], scales: Sequence[float] = (1.0,), flip: bool = False):
        self.class_names, self.scales, self.flip = list(class_names), tuple(scales), flip
        n = len(self.class_names)
        self.confusion = torch.zeros(n, n, dtype=torch.int64)

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.scales == (1.0,) and not self.flip:
            return model(images).argmax(1)
        return predict_probabilities(model, images, self.scales, self.flip).argmax(1)

    def update(self, model: nn.Module, batch) -> None:
        images, masks, sizes = batch
        h, w = images.shape[-2:]
        n = len(self.class_names)
        if all(tuple(s) == (h, w) for s in sizes):
            self.confusion += confusion_matrix(self.predict(model, images), masks, n).cpu()
            return
        for i, (hi, wi) in enumerate(sizes):
            pred = self.predict(model, images[i:i + 1, :, :hi, :wi])
            self.confusion += confusion_matrix(pred, masks[i:i + 1, :hi, :wi], n).cpu()

    def compute(self, ctx: distributed.Dist) -> dict[str, float]:
        total = distributed.all_reduce_sum(self.confusion.clone(), ctx)
        self.summary = segmentation_metrics(total, self.class_names)
        return {"mIoU": self.summary["mIoU"], "pixel_acc": self.summary["pixel_acc"]}
