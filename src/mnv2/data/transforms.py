"""Classification transforms: the train and eval presets and batch-level MixUp/CutMix, all torchvision.transforms.v2.

They take uint8 CHW tensors (what `ImageFolderDataset` yields) or PIL images. On tensors they were measured 1.4-2.8x
faster than on PIL images here (RandomResizedCrop + flip + normalise, 96 and 224 px outputs); only TrivialAugment on
small images is ~15% slower. Any resolution works, odd ones included.

The paper's ImageNet recipe (its TF-Slim release) trains on Inception-style random-size crops with flips and evaluates
a centre crop of 87.5% of the resized image (256 -> 224): `train_preset` and `eval_preset` are those two. The options
cover the torchvision "V2" recipe as well (TrivialAugment, random erasing 0.1, MixUp 0.2 / CutMix 1.0).
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                   "nearest": v2.InterpolationMode.NEAREST}


def _interp(name: str) -> v2.InterpolationMode:
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {name!r}") from None


class ContiguousImage(v2.Transform):
    """Tensors (the image, a mask) laid out contiguously in memory; their values unchanged.

    A PIL image becomes a tensor that is a (C, H, W) view of (H, W, C) memory, and resizing keeps that layout. The
    float conversion and normalisation after it ran ~4x slower on it here (0.55 vs 0.14 ms at 320 x 320, one thread)
    than on a contiguous copy, and the copy is of the uint8 pixels: so every preset copies first (detection's eval
    preprocessing of a 640 x 480 image 1.66 -> 0.80 ms, one thread, a loaded host)."""

    _transformed_types = (torch.Tensor,)  # tv_tensors of every kind, and a plain tensor image (v2's rules)

    def transform(self, inpt, params):
        return inpt if inpt.is_contiguous() else tv_tensors.wrap(inpt.contiguous(), like=inpt)


def to_float_steps(mean, std, dtype=torch.float32) -> list:
    """The last steps of every preset: contiguous, to float in 0..1 (masks: `dtype` may map them), normalised."""
    return [ContiguousImage(), v2.ToDtype(dtype, scale=True), v2.Normalize(list(mean), list(std))]


def _to_normalized(mean, std) -> list:
    return [v2.ToImage(), *to_float_steps(mean, std)]


def train_preset(resolution: int, *, scale=(0.08, 1.0), hflip: float = 0.5, color_jitter: float = 0.0,
                 auto_augment: str | None = None, random_erasing: float = 0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 interpolation: str = "bilinear") -> v2.Compose:
    """Random-resized crop to `resolution` (area fraction in `scale`, aspect 3/4..4/3), horizontal flip, optional
    colour jitter (brightness/contrast/saturation strength), optional TrivialAugment, then float normalisation and
    optional random erasing (probability)."""
    steps = [v2.RandomResizedCrop(resolution, scale=tuple(scale), interpolation=_interp(interpolation),
                                  antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=_interp(interpolation)))
    elif auto_augment is not None:
        raise ValueError(f"auto_augment must be None or 'trivialaugment', got {auto_augment!r}")
    steps += _to_normalized(mean, std)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing))
    return v2.Compose(steps)


def eval_preset(resolution: int, *, crop_fraction: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                interpolation: str = "bilinear") -> v2.Compose:
    """Resize the shorter side to round(resolution / crop_fraction), centre-crop `resolution`, normalise.
    (0.875: 256 -> 224, the evaluation behind the paper's ImageNet numbers.)"""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return v2.Compose([v2.Resize(round(resolution / crop_fraction), interpolation=_interp(interpolation),
                                 antialias=True),
                       v2.CenterCrop(resolution), *_to_normalized(mean, std)])


def squash_preset(resolution: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear"
                  ) -> v2.Compose:
    """The whole image resized to `resolution` x `resolution` (no crop, aspect not kept), normalised: how models
    trained in Keras see their inputs (`keras.utils.load_img(path, target_size=(r, r))`).

    The resize runs on a PIL image, as Keras' does: torchvision's antialiased resize of a uint8 tensor rounds 1-3% of
    the pixels one grey level away from PIL's, and a Keras model's probabilities are then not reproduced to 1e-4.
    """
    return v2.Compose([v2.ToPILImage(), v2.Resize((resolution, resolution), interpolation=_interp(interpolation)),
                       *_to_normalized(mean, std)])


def eval_preset_for(record: dict) -> v2.Compose:
    """The classification eval transform a weights file's preprocess record names (`mnv2.interop.preprocess_record`):
    `eval_preset` for resize "crop" (the default), `squash_preset` for "squash"."""
    resolution, resize = int(record["resolution"]), record.get("resize", "crop")
    options = {"mean": record["mean"], "std": record["std"], "interpolation": record.get("interpolation", "bilinear")}
    if resize == "squash":
        return squash_preset(resolution, **options)
    if resize != "crop":
        raise ValueError(f"a classifier's resize must be 'crop' or 'squash', got {resize!r}")
    return eval_preset(resolution, crop_fraction=float(record.get("crop_fraction", 0.875)), **options)


def mixup_cutmix(num_classes: int, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0):
    """MixUp (Beta(alpha, alpha) blend) and/or CutMix, one chosen at random per batch, as a transform of a collated
    batch `(images, labels) -> (images, soft labels [N, num_classes])`; None when both alphas are 0. The trainer
    applies it in the main process, so a resumed run draws the same mixes."""
    choices = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
