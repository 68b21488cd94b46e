"""Segmentation transforms (DeepLab's training augmentation, the full-resolution evaluation) and the batch collate.

They take `(tv_tensors.Image uint8 [3, H, W], tv_tensors.Mask int64 [H, W])`, as `voc.SegmentationDataset` passes
them, and are torchvision.transforms.v2 pipelines: v2 resizes a Mask with nearest-neighbour interpolation whatever the
image's interpolation, and pads each type with its own fill. Every random draw comes from torch's global generator,
which the trainer seeds per sample (`engine.data_order.SeededSamples`): the same seed gives the same sample.

Training (paper section 6.3, TF DeepLab's input pipeline): the whole image scaled by a random factor in [0.5, 2.0]
(bilinear for the image, nearest for the mask), padded to at least the crop size, a random crop, a left-right flip.
The padding is the mean colour in the image -- zero after normalisation, the value `segmentation_collate` pads
evaluation batches with, and what TF DeepLab pads with -- and `ignore_index` in the mask, so padded pixels take no
part in the loss. Everything before the last step runs on uint8 tensors (the mask too: the dataset guarantees values
in 0..255), where torchvision's resize, pad and crop kernels are fastest: 2.3 ms per 500 x 375 VOC-size sample at
crop 513 against 5.2 ms when the image is made float first (one thread, median of 5 rounds of 40, loaded machine).
The mask comes out int64.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD, to_float_steps

IGNORE_INDEX = 255  # VOC's "void": object boundaries and unlabelled regions, excluded from loss and metric


class RandomScale(v2.Transform):
    """Resize the whole sample by one factor drawn uniformly from `scale` (aspect ratio kept).

    TF DeepLab draws the factor from [0.5, 2.0] (in steps of 0.25 by default; uniform here, as torchvision's
    segmentation reference does). v2.RandomResize and v2.ScaleJitter resize towards a fixed target size, not by a
    factor of each image's own size, hence this small transform.
    """

    def __init__(self, scale: tuple[float, float]):
        super().__init__()
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        self.scale = (lo, hi)

    def make_params(self, flat_inputs: list) -> dict:
        h, w = F.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)))
        lo, hi = self.scale
        factor = lo + (hi - lo) * float(torch.rand(()))
        return {"size": [max(1, round(h * factor)), max(1, round(w * factor))]}

    def transform(self, inpt, params: dict):
        # F.resize dispatches on the type: a Mask is resized with nearest neighbours, without antialiasing.
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


def _pair(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"crop_size must be positive, got {size}")
    return int(h), int(w)


def _to_float_normalized(mean, std) -> list:
    # The image to float in 0..1 then normalised; the mask to the int64 class indices the loss takes.
    return to_float_steps(mean, std, {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None})


def segmentation_train_preset(crop_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=(0.5, 2.0), hflip: bool = True,
                              ignore_index: int = IGNORE_INDEX) -> v2.Compose:
    """Random scale, pad to at least `crop_size` (int or (h, w)), random crop, flip, normalise (module docstring).

    The image is padded with the mean colour (0 after normalisation), the mask with `ignore_index`. Output: image
    float [3, h, w], mask int64 [h, w], both of size `crop_size`. `scale=None` or (1, 1) turns the scaling off.
    """
    crop = _pair(crop_size)
    if not 0 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be in 0..255 (masks stay uint8 until the last step), got {ignore_index}")
    fill = tuple(round(255 * m) for m in mean)  # the mean colour in 0..255 pixels
    steps = [v2.ToDtype({tv_tensors.Mask: torch.uint8, "others": None})]  # nearest-neighbour kernels on uint8
    if scale is not None and tuple(scale) != (1, 1):
        steps.append(RandomScale(scale))
    # pad_if_needed pads each short side by the whole shortfall on both ends, so the random crop places the
    # image uniformly inside the crop window.
    steps.append(v2.RandomCrop(crop, pad_if_needed=True,
                               fill={tv_tensors.Image: fill, tv_tensors.Mask: ignore_index, "others": 0}))
    if hflip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps + _to_float_normalized(mean, std))


def segmentation_eval_preset(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The image at its full resolution (the VOC metric is computed there), normalised; the mask as int64."""
    return v2.Compose(_to_float_normalized(mean, std))


def segmentation_collate(samples, ignore_index: int = IGNORE_INDEX):
    """(images [N, 3, H, W], masks [N, H, W] int64, sizes [(h, w)] per sample) from `(image, mask)` pairs.

    Samples of one size (training crops) are stacked. Samples of different sizes (evaluation at full resolution)
    are padded at the bottom and right to the largest height and width of the batch: images with 0 (the mean
    colour, after normalisation), masks with `ignore_index`. `sizes` gives each sample's own size, so predictions
    can be cropped back to it: `pred[i, :h, :w]`. Use `functools.partial` for another `ignore_index`.
    """
    images, masks = zip(*samples)
    sizes = []
    for image, mask in zip(images, masks):
        if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
            raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} of a sample differ in size")
        sizes.append((int(mask.shape[-2]), int(mask.shape[-1])))
    images = [i.as_subclass(torch.Tensor) for i in images]
    masks = [m.as_subclass(torch.Tensor).long() for m in masks]
    if len(set(sizes)) == 1:
        return torch.stack(images), torch.stack(masks), sizes
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    labels = torch.full((len(masks), height, width), ignore_index, dtype=torch.int64)
    for i, ((h, w), image, mask) in enumerate(zip(sizes, images, masks)):
        batch[i, :, :h, :w] = image
        labels[i, :h, :w] = mask
    return batch, labels, sizes
