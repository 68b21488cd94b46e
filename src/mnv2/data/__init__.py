"""Datasets in their own on-disk formats, the transforms for each task, and the embedded synthetic dataset.

Names are imported on first use (PEP 562), so `mnv2.data.synthetic` and the CLI start without importing torchvision.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for readers and type checkers; at run time, see __getattr__
    from .coco import CocoDetection, find_coco_split
    from .detection_transforms import detection_collate, detection_eval_preset, detection_train_preset
    from .imagefolder import BadImageReport, ImageFolderDataset
    from .images import BadImageError, load_image
    from .loader import build_classification_loader
    from .segmentation_transforms import segmentation_collate, segmentation_eval_preset, segmentation_train_preset
    from .synthetic import ensure_demo_dataset, write_dataset
    from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_preset, mixup_cutmix, train_preset
    from .voc import SegmentationDataset, find_voc, folder_samples, segmentation_samples

_EXPORTS = {
    "CocoDetection": "coco", "find_coco_split": "coco",
    "detection_collate": "detection_transforms", "detection_eval_preset": "detection_transforms",
    "detection_train_preset": "detection_transforms",
    "BadImageError": "images", "load_image": "images",
    "BadImageReport": "imagefolder", "ImageFolderDataset": "imagefolder",
    "build_classification_loader": "loader",
    "ensure_demo_dataset": "synthetic", "write_dataset": "synthetic",
    "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms", "eval_preset": "transforms",
    "mixup_cutmix": "transforms", "train_preset": "transforms",
    "segmentation_collate": "segmentation_transforms", "segmentation_eval_preset": "segmentation_transforms",
    "segmentation_train_preset": "segmentation_transforms",
    "SegmentationDataset": "voc", "find_voc": "voc", "folder_samples": "voc", "segmentation_samples": "voc",
}
__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "BadImageReport",
    "CocoDetection",
    "ImageFolderDataset",
    "SegmentationDataset",
    "build_classification_loader",
    "detection_collate",
    "detection_eval_preset",
    "detection_train_preset",
    "ensure_demo_dataset",
    "eval_preset",
    "find_coco_split",
    "find_voc",
    "folder_samples",
    "load_image",
    "mixup_cutmix",
    "segmentation_collate",
    "segmentation_eval_preset",
    "segmentation_samples",
    "segmentation_train_preset",
    "train_preset",
    "write_dataset",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
