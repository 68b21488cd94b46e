"""Detection transforms (SSD augmentation and the evaluation resize) and the batch collate, torchvision.transforms.v2.

They take `(tv_tensors.Image uint8, target)` where target holds `tv_tensors.BoundingBoxes` (XYXY pixels, canvas_size
set), "labels" and "iscrowd", as `coco.CocoDetection` passes them. Every random draw comes from torch's global
generator, which the trainer seeds per sample (`engine.data_order.SeededSamples`): the same seed gives the same sample.

SSD's augmentation (Liu et al. 2016, section 2.2; the TF Object Detection API's `ssd_random_crop` + flip in the
paper's config; torchvision's SSD recipe adds the photometric distortion and zoom-out): colour distortion, zoom out
(the image placed on a canvas up to `zoom_out` times larger, filled with the mean colour, so small objects are
seen), a random crop that keeps at least one box at a sampled IoU, a flip, then the whole image resized to a square
(aspect not kept, as TF's `fixed_shape_resizer`).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD, to_float_steps


def _labels_and_crowd(sample):
    # SanitizeBoundingBoxes filters these together with the boxes, so the flags stay aligned with their boxes.
    _, target = sample
    return target["labels"], target["iscrowd"]


class IfBoxes(torch.nn.Module):
    """Apply `transform` only to samples that hold at least one box.

    v2.RandomIoUCrop on an image without boxes never finds a crop with a box centre inside: it redraws its IoU option
    until "no crop" comes up (here up to ~30 ms, and a variable number of draws from the generator). Skipping it gives
    the same result, at once. Such images stay in training as pure background (contract: G == 0 -> all negatives).
    """

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def forward(self, *inputs):
        flat, _ = tree_flatten(inputs)
        if any(isinstance(x, tv_tensors.BoundingBoxes) and x.shape[0] > 0 for x in flat):
            return self.transform(*inputs)
        return inputs if len(inputs) > 1 else inputs[0]


class RandomIoUCrop(v2.RandomIoUCrop):
    """torchvision's SSD random IoU crop with its trials drawn and checked all at once.

    v2.RandomIoUCrop tries up to 40 crops one by one, each with a few small-tensor ops (box_iou on a handful of
    boxes): ~9 ms of an 11 ms training sample at 128 px, the largest cost of detection data loading. Here each
    sampled IoU option draws all its trials in two `torch.rand` calls, scores them against every box in one box_iou,
    and takes the first that passes -- the same distribution of crops as the sequential loop (the trials are
    independent and the first valid one wins), from the same global generator, in under a millisecond.
    """

    def make_params(self, flat_inputs: list) -> dict:
        orig_h, orig_w = F.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)))
        boxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        xyxy = F.convert_bounding_box_format(boxes.as_subclass(torch.Tensor), boxes.format,
                                             tv_tensors.BoundingBoxFormat.XYXY).float()
        cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
        while True:
            min_iou = self.options[int(torch.randint(len(self.options), (1,)))]
            if min_iou >= 1.0:  # the "leave the image as it is" option
                return {}
            scale = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(self.trials, 2)
            new_w, new_h = (orig_w * scale[:, 0]).long(), (orig_h * scale[:, 1]).long()
            position = torch.rand(self.trials, 2)
            left, top = ((orig_w - new_w) * position[:, 0]).long(), ((orig_h - new_h) * position[:, 1]).long()
            right, bottom = left + new_w, top + new_h
            aspect = new_w / new_h.clamp(min=1)
            ok = (new_w > 0) & (new_h > 0) & (aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio)
            # [trials, boxes]: the box centre lies strictly inside the crop
            inside = ((left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None]))
            crops = torch.stack((left, top, right, bottom), dim=1).float()
            iou = box_iou(crops, xyxy).masked_fill(~inside, -1.0)
            ok &= inside.any(dim=1) & (iou.max(dim=1).values >= min_iou)
            if ok.any():
                t = int(ok.nonzero()[0])
                return {"top": int(top[t]), "left": int(left[t]), "height": int(new_h[t]), "width": int(new_w[t]),
                        "is_within_crop_area": inside[t]}


def detection_train_preset(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip: float = 0.5,
                           zoom_out: float = 4.0, iou_crop: bool = True, photometric: bool = True,
                           rot90: bool = False) -> v2.Compose:
    """SSD augmentation to a `size` x `size` normalised float image (see the module docstring).

    `zoom_out`: largest canvas side as a multiple of the image's (torchvision's and SSD's 4; <= 1 turns it off).
    `rot90`: rotate by 0, 90, 180 or 270 degrees, uniformly (exact for the boxes; the canvas turns with the image).
    Only for classes that are the same under rotation, as the synthetic shapes; COCO's are not.
    Boxes left smaller than 1 pixel or outside the crop are removed with their labels and iscrowd flags.
    """
    steps = []
    if photometric:
        steps.append(v2.RandomPhotometricDistort())
    if zoom_out > 1:
        fill = tuple(round(255 * m) for m in mean)  # the mean colour in 0..255 pixels: zero after Normalize
        steps.append(v2.RandomZoomOut(fill={tv_tensors.Image: fill, "others": 0}, side_range=(1.0, zoom_out)))
    if iou_crop:
        steps.append(IfBoxes(RandomIoUCrop()))
    if rot90:
        steps.append(v2.RandomChoice([v2.RandomRotation((d, d), expand=True) for d in (0, 90, 180, 270)]))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.Resize((size, size), antialias=True), v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd),
              *to_float_steps(mean, std)]
    return v2.Compose(steps)


def detection_resize(size: int) -> v2.Resize:
    """The evaluation resize: the whole uint8 image to `size` x `size` (as in training), aspect not kept."""
    return v2.Resize((size, size), antialias=True)


def detection_eval_preset(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The whole image resized to `size` x `size` (as in training), normalised. Deterministic."""
    return v2.Compose([detection_resize(size), *to_float_steps(mean, std)])


def detection_collate(batch):
    """(images [N, 3, S, S], list of N target dicts): targets hold different numbers of boxes, so they stay a list."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
