import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_convert

from mnv2.detection import LAYOUTS, feature_map_sizes, num_anchors_per_location, ssd_anchors
from mnv2.errors import UserError

# The contract's feature map sizes (stride-2 3x3 convs with padding 1 map n -> ceil(n / 2)).
GRIDS = {
    300: [(19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
    320: [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
    160: [(10, 10), (5, 5), (3, 3), (2, 2), (1, 1), (1, 1)],
    128: [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1), (1, 1)],
}


def tf_ssd_anchors(grids, num_layers=6, min_scale=0.2, max_scale=0.95):
    """TF Object Detection API create_ssd_anchors + MultipleGridAnchorGenerator, written out plainly (square input)."""
    scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1) for i in range(num_layers)] + [1.0]
    anchors = []
    for layer, (height, width) in enumerate(grids):
        if layer == 0:
            box_specs = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            box_specs = [(scales[layer], ar) for ar in (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)]
            box_specs.append((math.sqrt(scales[layer] * scales[layer + 1]), 1.0))
        for i in range(height):
            for j in range(width):
                for scale, ar in box_specs:
                    anchors.append([(j + 0.5) / width, (i + 0.5) / height, scale * math.sqrt(ar), scale / math.sqrt(ar)])
    return torch.tensor(anchors, dtype=torch.float32)


@pytest.mark.parametrize("size", sorted(GRIDS))
def test_feature_map_sizes(size):
    assert feature_map_sizes(size) == GRIDS[size]
    assert feature_map_sizes((size, size)) == GRIDS[size]


def test_feature_map_sizes_non_square():
    assert feature_map_sizes((320, 160)) == [(h, w) for (h, _), (w, _) in zip(GRIDS[320], GRIDS[160])]


def test_anchor_counts_tf():
    assert num_anchors_per_location("tf") == (3, 6, 6, 6, 6, 6)
    assert ssd_anchors(300).shape == (1917, 4)
    assert ssd_anchors(320).shape == (2034, 4)
    assert ssd_anchors(320).dtype == torch.float32


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", sorted(GRIDS))
def test_count_is_sum_over_layers(layout, size):
    per_location = num_anchors_per_location(layout)
    assert len(ssd_anchors(size, layout)) == sum(h * w * n for (h, w), n in zip(GRIDS[size], per_location))


@pytest.mark.parametrize("size", [300, 320])
def test_tf_anchors_equal_tf_formula(size):
    expected = tf_ssd_anchors(GRIDS[size])
    anchors = ssd_anchors(size, "tf")
    torch.testing.assert_close(anchors, expected)
    # The first anchors of every layer, named explicitly: layer boundaries must fall where the head's outputs do.
    start = 0
    for (h, w), n in zip(GRIDS[size], (3, 6, 6, 6, 6, 6)):
        torch.testing.assert_close(anchors[start:start + n], expected[start:start + n])
        assert anchors[start, 0].item() == pytest.approx(0.5 / w) and anchors[start, 1].item() == pytest.approx(0.5 / h)
        start += h * w * n
    assert start == len(anchors)


def test_tf_lowest_layer_and_last_layer_values():
    anchors = ssd_anchors(320, "tf")
    r2 = math.sqrt(2.0)
    torch.testing.assert_close(anchors[:3, 2:], torch.tensor([[0.1, 0.1], [0.2 * r2, 0.2 / r2], [0.2 / r2, 0.2 * r2]]))
    # The 1x1 map: centred, scale 0.95, and the interpolated square anchor sqrt(0.95 * 1.0).
    last = anchors[-6:]
    assert torch.all(last[:, :2] == 0.5)
    torch.testing.assert_close(last[-1, 2:], torch.full((2,), math.sqrt(0.95)))
    torch.testing.assert_close(last[0, 2:], torch.full((2,), 0.95))


@pytest.mark.parametrize("size", [300, 320])
def test_torchvision_layout_equals_default_box_generator(size):
    generator = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    feature_maps = [torch.zeros(1, 1, h, w) for h, w in GRIDS[size]]
    reference = generator(images, feature_maps)[0] / size  # pixel xyxy -> normalised xyxy
    ours = box_convert(ssd_anchors(size, "torchvision"), "cxcywh", "xyxy")
    assert tuple(generator.num_anchors_per_location()) == num_anchors_per_location("torchvision")
    torch.testing.assert_close(ours, reference)


def test_tf_anchors_square_in_pixels_on_non_square_input():
    # TF scales its base anchor by min(h, w) / h and / w, so aspect ratio 1 stays square in pixels.
    height, width = 320, 640
    anchors = ssd_anchors((height, width), "tf")
    assert len(anchors) == sum(h * w * n for (h, w), n in zip(feature_map_sizes((height, width)), (3, 6, 6, 6, 6, 6)))
    first = anchors[0]
    assert first[2].item() * width == pytest.approx(0.1 * height)
    assert first[3].item() * height == pytest.approx(0.1 * height)


def test_returned_anchors_can_be_modified_without_touching_the_cache():
    anchors = ssd_anchors(320)
    anchors.zero_()
    assert ssd_anchors(320).abs().sum() > 0


def test_bad_layout_is_a_user_error():
    with pytest.raises(UserError, match="bogus"):
        ssd_anchors(320, "bogus")
    with pytest.raises(UserError, match="bogus"):
        num_anchors_per_location("bogus")
