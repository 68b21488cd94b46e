"""Train / eval presets at any resolution, and batch-level MixUp / CutMix."""

import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from mnv2.data import eval_preset, mixup_cutmix, train_preset

RESOLUTIONS = [32, 63, 96, 97, 161, 224]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_presets_give_the_requested_shape(resolution):
    tensor = torch.randint(0, 256, (3, 75, 130), dtype=torch.uint8)  # non-square, smaller than some outputs
    pil = Image.new("RGB", (90, 141), (12, 200, 7))
    full = train_preset(resolution, color_jitter=0.4, auto_augment="trivialaugment", random_erasing=0.5)
    for transform in (train_preset(resolution), full, eval_preset(resolution),
                      eval_preset(resolution, crop_fraction=1.0, interpolation="bicubic")):
        for image in (tensor, pil):
            out = transform(image)
            assert out.shape == (3, resolution, resolution) and out.dtype == torch.float32
            assert torch.isfinite(out).all()


def test_eval_preset_resizes_shorter_side_then_centre_crops():
    # Shorter side 60 = round(30 / 0.5): no resize, so the output is exactly the central 30x30 window, scaled.
    x = torch.randint(0, 256, (3, 60, 100), dtype=torch.uint8)
    out = eval_preset(30, crop_fraction=0.5, mean=(0, 0, 0), std=(1, 1, 1))(x)
    assert torch.allclose(out, x[:, 15:45, 35:65].float() / 255, atol=1e-6)
    # Default 0.875 at 224 resizes the shorter side to 256, like the paper's evaluation.
    y = eval_preset(224).transforms[0](torch.zeros(3, 300, 500, dtype=torch.uint8))
    assert y.shape[:2] == (3, 256) and y.shape[2] in (426, 427)  # longer side keeps the aspect ratio


def test_normalisation_uses_mean_and_std():
    x = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    out = eval_preset(8, crop_fraction=1.0, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))(x)
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))


def test_train_preset_flips_and_crops_randomly():
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    # Area fraction 1 on a square image: no aspect other than 1 fits, so the crop is the whole image; hflip=1 flips.
    whole = train_preset(16, scale=(1.0, 1.0), hflip=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(whole(x), x.flip(-1).float() / 255, atol=1e-6)
    random = train_preset(16)
    assert not torch.equal(random(x), random(x))


def test_bad_options_raise():
    with pytest.raises(ValueError):
        train_preset(32, auto_augment="randaugment")
    with pytest.raises(ValueError):
        eval_preset(32, interpolation="lanczos3")
    with pytest.raises(ValueError):
        eval_preset(32, crop_fraction=0)


def test_mixup_cutmix_soft_targets():
    assert mixup_cutmix(10, mixup_alpha=0.0, cutmix_alpha=0.0) is None
    batch = [(torch.rand(3, 16, 16), i % 4) for i in range(8)]
    for mixup, cutmix in ((0.2, 1.0), (0.2, 0.0), (0.0, 1.0)):
        x, y = mixup_cutmix(4, mixup_alpha=mixup, cutmix_alpha=cutmix)(*default_collate(batch))
        assert x.shape == (8, 3, 16, 16) and y.shape == (8, 4)
        assert torch.allclose(y.sum(dim=1), torch.ones(8))
        assert (y > 0).sum(dim=1).max() <= 2  # each row mixes at most two classes
    torch.manual_seed(1)
    x, y = mixup_cutmix(4, mixup_alpha=0.2, cutmix_alpha=0.0)(*default_collate(batch))
    lam = y.max(dim=1).values
    assert (lam < 1).any()  # some samples actually mixed


def test_presets_make_the_image_contiguous_without_changing_a_value():
    # A PIL image becomes a (C, H, W) view of (H, W, C) memory; the presets copy it to contiguous before the float
    # steps (ContiguousImage), which must not change the result nor the tv_tensor types of image, mask and boxes.
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from mnv2.data.detection_transforms import detection_eval_preset
    from mnv2.data.segmentation_transforms import segmentation_eval_preset
    from mnv2.data.transforms import ContiguousImage

    hwc = torch.randint(0, 256, (41, 57, 3), dtype=torch.uint8)
    strided, packed = hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous()
    assert not strided.is_contiguous()
    for preset in (eval_preset(32), detection_eval_preset(32), segmentation_eval_preset()):
        out = preset(tv_tensors.Image(strided))
        assert out.is_contiguous()
        assert torch.equal(out, preset(tv_tensors.Image(packed)))
    mask = tv_tensors.Mask(torch.zeros(57, 41, dtype=torch.uint8).t())
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 9.0, 9.0]]), format="XYXY", canvas_size=(41, 57))
    image, mask_out, boxes_out = ContiguousImage()(tv_tensors.Image(strided), mask, boxes)
    assert type(image) is tv_tensors.Image and type(mask_out) is tv_tensors.Mask
    assert type(boxes_out) is tv_tensors.BoundingBoxes and boxes_out.canvas_size == (41, 57)
    assert image.is_contiguous() and mask_out.is_contiguous() and torch.equal(image, strided)
    plain = v2.Compose([ContiguousImage()])(strided)  # a plain tensor image: made contiguous too
    assert plain.is_contiguous() and torch.equal(plain, strided)
