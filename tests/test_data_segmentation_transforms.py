"""Segmentation transforms and collate: image and mask stay aligned through scale, pad, crop and flip; padding is
void in the mask and the mean colour in the image; evaluation keeps full resolution; the collate pads with void."""

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors

from mnv2.data.segmentation_transforms import (
    IGNORE_INDEX,
    segmentation_collate,
    segmentation_eval_preset,
    segmentation_train_preset,
)
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
# One colour per class, far apart in RGB, so a pixel's colour tells its class.
COLOURS = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]],
                       dtype=torch.float32)


def coloured_sample(h: int = 72, w: int = 96, block: int = 12, seed: int = 0):
    """A mask of class blocks in an asymmetric layout (with some 255), and an image whose colour is its class's."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, len(COLOURS), (h // block + 1, w // block + 1), generator=g)
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w].clone()
    image = COLOURS[mask].permute(2, 0, 1).round().to(torch.uint8)
    mask[:block, -block:] = IGNORE_INDEX  # void, as VOC marks it; its pixels keep some class's colour
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    return (image * STD + MEAN) * 255


def interior(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels whose (2 radius + 1)^2 neighbourhood holds one class: bilinear blending of the image cannot reach them.
    Pixels near the crop's edge are left out: their neighbours beyond it are unknown."""
    m = mask.float()[None, None]
    lo = -nnf.max_pool2d(-m, 2 * radius + 1, stride=1, padding=radius)
    hi = nnf.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
    inside = ((lo == hi) & (m != IGNORE_INDEX))[0, 0]
    inside[:radius], inside[-radius:], inside[:, :radius], inside[:, -radius:] = False, False, False, False
    return inside


def test_train_preset_keeps_image_and_mask_aligned():
    image, mask = coloured_sample()
    transform = segmentation_train_preset(40, scale=(0.5, 2.0))
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.dtype == torch.float32 and out_image.shape == (3, 40, 40)
        assert out_mask.dtype == torch.int64 and out_mask.shape == (40, 40)
        assert set(out_mask.unique().tolist()) <= set(range(len(COLOURS))) | {IGNORE_INDEX}  # nearest: no new values
        inside = interior(out_mask)
        assert inside.sum() > 100
        colours = to_pixels(out_image).permute(1, 2, 0)[inside]  # [P, 3]
        nearest = torch.cdist(colours, COLOURS).argmin(dim=1)
        assert torch.equal(nearest, out_mask[inside]), f"seed {seed}"


def test_flip_moves_image_and_mask_together():
    image, mask = coloured_sample()
    transform = segmentation_train_preset((72, 96), scale=None)  # the crop is the whole image: only the flip acts
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        flipped = torch.equal(out_mask, mask.flip(-1).long())
        assert flipped or torch.equal(out_mask, mask.long())
        expected = image.flip(-1) if flipped else image
        assert torch.allclose(to_pixels(out_image), expected.float(), atol=1e-3)
        seen.add(flipped)
    assert seen == {True, False}


def test_train_preset_pads_the_mask_with_void_and_the_image_with_the_mean_colour():
    image, mask = coloured_sample(h=20, w=30)
    torch.manual_seed(0)
    out_image, out_mask = segmentation_train_preset(64, scale=None, hflip=False)(image, mask)
    assert out_mask.shape == (64, 64)
    # The whole image lies inside the crop: every labelled pixel is kept, every other one is void.
    assert (out_mask != IGNORE_INDEX).sum() == (mask != IGNORE_INDEX).sum()
    padded = out_mask == IGNORE_INDEX
    assert padded.sum() >= 64 * 64 - 20 * 30
    content = ~padded | (to_pixels(out_image) - MEAN * 255).abs().amax(0).gt(1)
    assert content.sum() == 20 * 30  # the image region, void corner included
    assert out_image[:, ~content].abs().max() < 0.02  # mean colour: ~0 after normalisation

    _, out_mask = segmentation_train_preset((64, 64), scale=None, ignore_index=0)(image, mask)
    assert (out_mask == 0).sum() >= 64 * 64 - 20 * 30
    with pytest.raises(ValueError):
        segmentation_train_preset(64, ignore_index=300)


def test_same_seed_same_sample():
    image, mask = coloured_sample()
    transform = segmentation_train_preset(32)
    torch.manual_seed(5)
    a = transform(image, mask)
    torch.manual_seed(5)
    b = transform(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_eval_preset_keeps_full_resolution():
    image, mask = coloured_sample(h=37, w=53)
    out_image, out_mask = segmentation_eval_preset()(image, mask)
    assert out_image.shape == (3, 37, 53) and torch.equal(out_mask, mask.long())
    assert torch.allclose(out_image, (image.float() / 255 - MEAN) / STD, atol=1e-6)


def test_collate_pads_with_void_and_returns_sizes():
    eval_preset = segmentation_eval_preset()
    samples = [eval_preset(*coloured_sample(h=h, w=w, seed=h)) for h, w in ((20, 30), (26, 18))]
    images, masks, sizes = segmentation_collate(samples)
    assert images.shape == (2, 3, 26, 30) and masks.shape == (2, 26, 30) and masks.dtype == torch.int64
    assert sizes == [(20, 30), (26, 18)]
    for (image, mask), (h, w), batch_image, batch_mask in zip(samples, sizes, images, masks):
        assert torch.equal(batch_image[:, :h, :w], image) and torch.equal(batch_mask[:h, :w], mask)
        outside = torch.ones(26, 30, dtype=torch.bool)
        outside[:h, :w] = False
        assert (batch_mask[outside] == IGNORE_INDEX).all() and (batch_image[:, outside] == 0).all()
    assert type(images) is torch.Tensor and type(masks) is torch.Tensor

    same = [eval_preset(*coloured_sample(seed=s)) for s in range(3)]
    images, masks, sizes = segmentation_collate(same)
    assert torch.equal(masks, torch.stack([m for _, m in same])) and sizes == [(72, 96)] * 3
    _, masks, _ = segmentation_collate(samples, ignore_index=0)
    assert masks[0, 20:, :].eq(0).all()


def test_uint8_samples_collate_too():
    image, mask = coloured_sample()
    images, masks, _ = segmentation_collate([(image, mask), (image[:, :10, :10], mask[:10, :10])])
    assert images.dtype == torch.uint8 and masks[1, 10:, :].eq(IGNORE_INDEX).all()
    assert np.array_equal(images[0].numpy(), image.numpy())
