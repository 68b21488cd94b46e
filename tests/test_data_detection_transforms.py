"""Detection transforms: boxes follow the pixels through every augmentation, labels and crowd flags stay aligned with
their boxes, the same seed gives the same sample, evaluation is deterministic."""

import pytest
import torch
from torchvision import tv_tensors

from mnv2.data import (
    CocoDetection,
    detection_collate,
    detection_eval_preset,
    detection_train_preset,
    find_coco_split,
    write_dataset,
)
from mnv2.data.detection_transforms import IfBoxes
from mnv2.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mnv2.engine.data_order import SeededSamples

NO_RANDOMNESS = {"hflip": 0.0, "zoom_out": 1.0, "iou_crop": False, "photometric": False}


def sample(height, width, boxes, labels=None, crowd=None, value=0):
    n = len(boxes)
    image = tv_tensors.Image(torch.full((3, height, width), value, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                format="XYXY", canvas_size=(height, width)),
              "labels": torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64),
              "iscrowd": torch.tensor(crowd if crowd is not None else [False] * n, dtype=torch.bool)}
    return image, target


def to_pixels(image):
    """Undo Normalize: 0..255 floats."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255


def test_flip_maps_a_box_to_its_mirror_with_the_pixels():
    image, target = sample(60, 120, [[10, 20, 40, 50]])
    image[:, 20:50, 10:40] = 255
    out_image, out = detection_train_preset(60, **{**NO_RANDOMNESS, "hflip": 1.0})(image, target)
    assert out_image.shape == (3, 60, 60)  # squashed to a square: x halves, y stays
    assert out["boxes"].tolist() == [[40.0, 20.0, 55.0, 50.0]]  # mirror of x 10..40 in 120 is 80..110, halved
    white = to_pixels(out_image).mean(0) > 128
    assert white[20:50, 41:54].all() and not white[:, :39].any() and not white[:, 56:].any()


def test_rot90_turns_box_and_canvas_with_the_pixels():
    # A non-square image: a quarter turn swaps its sides, so the squash to 64 x 64 differs per rotation; the box must
    # frame the white rectangle in every one, and all four rotations must occur.
    image, target = sample(60, 120, [[10, 20, 40, 50]])
    image[:, 20:50, 10:40] = 255
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out_image, out = detection_train_preset(64, **{**NO_RANDOMNESS, "rot90": True})(image.clone(), dict(target))
        white = to_pixels(out_image).mean(0) > 200
        ys, xs = torch.nonzero(white, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(out["boxes"][0], found, atol=1.5), (out["boxes"], found)
        seen.add(tuple(round(v) for v in out["boxes"][0].tolist()))
    assert len(seen) == 4


@pytest.mark.parametrize("seed", range(12))
def test_train_preset_boxes_stay_on_their_pixels(seed):
    # One white rectangle on black: wherever zoom-out, IoU crop, flip and resize put it, the box must frame it.
    image, target = sample(90, 150, [[30, 20, 110, 70]])
    image[:, 20:70, 30:110] = 255
    torch.manual_seed(seed)
    out_image, out = detection_train_preset(64, photometric=False)(image, target)
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    boxes = out["boxes"]
    assert ((boxes >= 0) & (boxes <= 64)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    if len(boxes):  # the crop can drop it (its centre outside): then nothing to compare
        white = to_pixels(out_image).mean(0) > 200
        ys, xs = torch.nonzero(white, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(boxes[0], found, atol=1.5), (boxes, found)


def test_sanitize_drops_labels_and_crowd_flags_with_their_boxes():
    # The first box shrinks below a pixel at 64 px: it goes, and the crowd flag must move with the second box.
    image, target = sample(640, 640, [[0, 0, 3, 3], [100, 100, 400, 400], [500, 500, 600, 600]],
                           labels=[4, 5, 6], crowd=[False, True, False])
    _, out = detection_train_preset(64, **NO_RANDOMNESS)(image, target)
    assert out["labels"].tolist() == [5, 6] and out["iscrowd"].tolist() == [True, False]
    assert out["boxes"].tolist() == [[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 60.0, 60.0]]


def test_crowd_flags_stay_aligned_through_random_crops():
    boxes = [[x, y, x + 30, y + 30] for x in (10, 100, 190) for y in (10, 100)]
    dropped = 0
    for seed in range(12):
        image, target = sample(140, 240, boxes, labels=list(range(1, 7)), crowd=[lab % 2 == 0 for lab in range(1, 7)])
        torch.manual_seed(seed)
        _, out = detection_train_preset(64, photometric=False)(image, target)  # colour moves no box; it is slow
        assert len(out["boxes"]) == len(out["labels"]) == len(out["iscrowd"])
        assert out["iscrowd"].tolist() == [lab % 2 == 0 for lab in out["labels"].tolist()]
        dropped += len(out["labels"]) < 6
    assert dropped >= 2  # the IoU crop did remove boxes, so the alignment was tested


def test_iou_crop_is_skipped_without_boxes():
    calls = []

    def record(*inputs):
        calls.append(len(inputs[1]["boxes"]))
        return inputs

    guarded = IfBoxes(record)
    empty = sample(40, 60, [])
    assert guarded(*empty) is not None and calls == []
    guarded(*sample(40, 60, [[1, 1, 9, 9]]))
    assert calls == [1]
    for seed in range(5):  # the whole preset on an image without boxes
        torch.manual_seed(seed)
        image, out = detection_train_preset(32)(*sample(40, 60, []))
        assert image.shape == (3, 32, 32) and out["boxes"].shape == (0, 4) and out["iscrowd"].shape == (0,)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), "detect", images=10, size=64)


def test_same_seed_same_sample_other_seed_differs(shapes):
    ds = SeededSamples(CocoDetection(*find_coco_split(shapes, "train"), transform=detection_train_preset(48)))
    state = torch.get_rng_state()
    a, b, c = ds[(3, 1234)], ds[(3, 1234)], ds[(3, 99)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert torch.equal(a[1]["labels"], b[1]["labels"])
    assert not torch.equal(a[0], c[0])
    for _, target in (a, c):
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_eval_preset_is_deterministic_and_collates(shapes):
    ds = CocoDetection(*find_coco_split(shapes, "val"), transform=detection_eval_preset(40))
    raw = CocoDetection(*find_coco_split(shapes, "val"))
    torch.manual_seed(1)
    first = ds[0]
    torch.manual_seed(2)
    again = ds[0]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    assert torch.allclose(first[1]["boxes"], raw[0][1]["boxes"], atol=1e-6)  # normalised boxes unchanged
    images, targets = detection_collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 40, 40) and [t["image_id"] for t in targets] == ds.image_ids[:2]


def _crop_statistics(transform, draws=2000):
    """Crops of a 200 x 120 image with three boxes: (fraction left uncropped, mean crop area fraction, mean width /
    height), and every crop checked against SSD's rules."""
    boxes = [[20, 10, 60, 50], [110, 40, 190, 110], [70, 70, 90, 85]]
    image, target = sample(120, 200, boxes)
    xyxy = target["boxes"].as_subclass(torch.Tensor)
    centres = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    whole, areas, aspects = 0, [], []
    torch.manual_seed(0)
    for _ in range(draws):
        params = transform.make_params([image, target["boxes"]])
        if not params:
            whole += 1
            continue
        top, left, h, w = params["top"], params["left"], params["height"], params["width"]
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 120
        assert 0.3 * 200 - 1 <= w <= 200 and 0.3 * 120 - 1 <= h <= 120 and 0.5 <= w / h <= 2
        inside = ((centres[:, 0] > left) & (centres[:, 0] < left + w) & (centres[:, 1] > top)
                  & (centres[:, 1] < top + h))
        assert inside.tolist() == params["is_within_crop_area"].tolist() and inside.any()
        areas.append(w * h / (200 * 120))
        aspects.append(w / h)
    return whole / draws, sum(areas) / len(areas), sum(aspects) / len(aspects)


def test_iou_crop_draws_the_crops_torchvision_draws():
    """Our vectorised RandomIoUCrop samples from the same distribution as torchvision's sequential one (the trials are
    independent and the first valid one wins in both); it draws different random numbers, so compare statistics."""
    from torchvision.transforms import v2

    from mnv2.data.detection_transforms import RandomIoUCrop

    ours, reference = _crop_statistics(RandomIoUCrop()), _crop_statistics(v2.RandomIoUCrop())
    assert ours[0] == pytest.approx(reference[0], abs=0.05)  # the "no crop" option: 1/7 of the draws, and retries
    assert ours[1] == pytest.approx(reference[1], rel=0.04)
    assert ours[2] == pytest.approx(reference[2], rel=0.04)
