"""What a deployed model needs besides its weights: eval preprocessing, class names, and image loading.

The preprocessing travels with the model (safetensors header, ONNX metadata_props), so an exported file alone is enough
to classify images (detect objects in them, segment them) the way the model was evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import load_image as data_load_image
from ..data.images import upright_rgb
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_preset_for
from ..errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_RESIZES = ("crop", "squash", "stretch", "none")


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize the short side to resolution / crop_fraction, centre-crop, normalise (resize
    "crop", classifiers); or the whole image resized to resolution x resolution with PIL, normalised (resize "squash",
    classifiers trained in Keras, as its `load_img` resizes); or the same on the uint8 tensor (resize "stretch", SSD
    detectors: TF's fixed_shape_resizer, the detection eval preset); or normalise only, the image at its own size
    (resize "none", segmentation models, which are evaluated at each image's full resolution: `resolution` is then
    the training crop, kept for calibration and fixed-size deployment, and not applied).

    crop_fraction 0.875 is the 224/256 centre crop that torchvision and TF-Slim evaluate ImageNet with.
    """

    resolution: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"
    resize: str = "crop"
    _transform: object = field(default=None, init=False, repr=False, compare=False)
    _pixels: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.resolution < 16:
            raise UserError(f"input resolution must be at least 16, got {self.resolution}")
        if self.interpolation not in _INTERPOLATIONS:
            raise UserError(f"unknown interpolation {self.interpolation!r}; expected one of {_INTERPOLATIONS}")
        if not 0 < self.crop_fraction <= 1:
            raise UserError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.resize not in _RESIZES:
            raise UserError(f"unknown resize {self.resize!r}; expected one of {_RESIZES}")
        if self.resize in ("stretch", "none") and self.interpolation != "bilinear":
            raise UserError(f"resize {self.resize!r} is bilinear, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        # The training code's eval preset: the model sees at deployment exactly what it saw in evaluation.
        if self.resize == "stretch":
            from torchvision.transforms import v2

            from ..data.detection_transforms import detection_eval_preset, detection_resize
            # on the uint8 tensor, as CocoDetection hands it to the preset in evaluation (PIL's resize differs)
            transform = v2.Compose([v2.PILToTensor(), detection_eval_preset(self.resolution, self.mean, self.std)])
            # the same resize alone, for the graphs that normalise in themselves (`pixels`)
            object.__setattr__(self, "_pixels", v2.Compose([v2.PILToTensor(), detection_resize(self.resolution)]))
        elif self.resize == "none":
            from torchvision.transforms import v2

            from ..data.segmentation_transforms import segmentation_eval_preset
            # the segmentation eval preset itself, on the uint8 image as SegmentationDataset hands it over
            transform = v2.Compose([v2.ToImage(), segmentation_eval_preset(self.mean, self.std), _plain_tensor])
        else:  # a classifier's: "crop" or "squash"
            transform = eval_preset_for(self.to_dict())
        object.__setattr__(self, "_transform", transform)

    @classmethod
    def from_dict(cls, d: dict | None, resolution: int | None = None) -> Preprocess:
        """From a model config's "preprocess" entry (missing keys take ImageNet defaults); `resolution` overrides."""
        d = {k: v for k, v in (d or {}).items() if k in ("resolution", "mean", "std", "crop_fraction",
                                                           "interpolation", "resize")}
        if resolution is not None:
            d["resolution"] = resolution
        return cls(**d)

    def to_dict(self) -> dict:
        d = {"resolution": self.resolution, "mean": list(self.mean), "std": list(self.std),
             "crop_fraction": self.crop_fraction, "interpolation": self.interpolation}
        return d if self.resize == "crop" else {**d, "resize": self.resize}  # classifier metadata as it always was

    def __call__(self, images: list) -> torch.Tensor:
        """A float batch [N, 3, R, R] from image paths or PIL images (resize "none": [N, 3, H, W], images of one
        size)."""
        tensors = [self._transform(load_image(im)) for im in images]
        if len({tuple(t.shape) for t in tensors}) > 1:
            raise UserError("images of different sizes cannot share a batch without a resize; batch them by size")
        return torch.stack(tensors)

    def pixels(self, images: list) -> np.ndarray:
        """uint8 [N, R, R, 3]: the images resized as `__call__` resizes them, not normalised -- the input of an
        exported detector, which normalises in its graph (mnv2.deploy.export_detection). Resize "stretch" only."""
        if self._pixels is None:
            raise UserError(f"resize {self.resize!r}: only a detector's stretched resize has a uint8 graph input")
        return torch.stack([self._pixels(load_image(im)).permute(1, 2, 0) for im in images]).numpy()


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


def load_image(image) -> Image.Image:
    """An RGB PIL image from a path (the data package's loader: any mode, EXIF orientation, BadImageError naming the
    file) or a PIL image."""
    if isinstance(image, Image.Image):
        return upright_rgb(image)  # what data_load_image makes of the same picture as a file
    return data_load_image(image)


def list_images(directory: str | Path) -> list[Path]:
    """Every image file under `directory` (recursively), sorted; a UserError if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    found = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise UserError(f"{directory}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return found


def imagenet_class_names() -> list[str]:
    """The 1000 ILSVRC-2012 class names in index order (one common name per synset)."""
    text = resources.files("mnv2").joinpath("resources/imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def resolve_class_names(names: list[str] | None, num_classes: int) -> list[str]:
    """The model's own names; else ImageNet's for a 1000-way model; else "class_N"."""
    if names:
        if len(names) != num_classes:
            raise UserError(f"model has {num_classes} outputs but {len(names)} class names")
        return list(names)
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)]


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))
