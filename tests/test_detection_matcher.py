import torch
from torchvision.ops import box_convert, box_iou

from mnv2.detection import match_anchors, ssd_anchors

# Coordinates are multiples of powers of two so every IoU below is exact in float32.
GT = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
ANCHORS = torch.tensor([
    [0.0, 0.0, 0.5, 0.5],      # IoU 1
    [0.0, 0.0, 0.5, 0.25],     # IoU exactly 0.5
    [0.0, 0.0, 0.5, 0.125],    # IoU 0.25
    [0.5, 0.5, 1.0, 1.0],      # IoU 0
])


def test_threshold_is_inclusive_and_the_rest_is_background():
    assert match_anchors(GT, ANCHORS).tolist() == [0, 0, -1, -1]
    assert match_anchors(GT, ANCHORS, iou_threshold=0.6).tolist() == [0, -1, -1, -1]
    assert match_anchors(GT, ANCHORS, iou_threshold=0.25).tolist() == [0, 0, 0, -1]


def test_positive_takes_the_gt_of_highest_iou():
    gts = torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.5, 0.5]])
    # Anchor 1 equals gt 0 (IoU 1) and has IoU 0.5 with gt 1; anchor 0 equals gt 1.
    assert match_anchors(gts, ANCHORS).tolist() == [1, 0, 0, -1]


def test_gt_with_low_best_iou_is_forced_onto_its_best_anchor():
    tiny = torch.tensor([[0.75, 0.75, 0.875, 0.875]])  # IoU 1/16 with anchor 3, 0 with the others
    assert box_iou(tiny, ANCHORS).max().item() < 0.5
    assert match_anchors(torch.cat((GT, tiny)), ANCHORS).tolist() == [0, 0, -1, 1]


def test_forcing_overrides_a_threshold_positive():
    # gt 1's best anchor is anchor 1 (IoU 1/4), which gt 0 holds by IoU 0.5: the forced match wins, as in TF.
    gts = torch.cat((GT, torch.tensor([[0.0, 0.1875, 0.5, 0.25]])))
    assert box_iou(gts[1:], ANCHORS).tolist() == [[0.125, 0.25, 0.0, 0.0]]
    assert match_anchors(gts, ANCHORS).tolist() == [0, 1, -1, -1]


def test_two_gts_with_the_same_best_anchor_lowest_index_wins():
    # Both gts' best anchor is anchor 0. TF (tf.argmax over the one-hot rows) gives it to the first gt, although by
    # IoU it belongs to gt 1 (IoU 1 against 0.75).
    gts = torch.tensor([[0.0, 0.0, 0.5, 0.375], [0.0, 0.0, 0.5, 0.5]])
    assert box_iou(gts, ANCHORS).argmax(dim=1).tolist() == [0, 0]
    assert match_anchors(gts, ANCHORS)[0].item() == 0


def test_every_gt_gets_an_anchor_on_real_anchors():
    g = torch.Generator().manual_seed(0)
    anchors = box_convert(ssd_anchors(320), "cxcywh", "xyxy")
    xy = torch.rand(12, 2, generator=g) * 0.8
    wh = torch.rand(12, 2, generator=g) * 0.15 + 0.005
    gts = torch.cat((xy, xy + wh), dim=1)
    gts = torch.cat((gts, torch.tensor([[0.5, 0.5, 0.51, 0.503]])))  # 3 x 1 pixels at 320
    assert box_iou(gts[-1:], anchors).max().item() < 0.5
    matches = match_anchors(gts, anchors)
    assert set(matches.tolist()) >= set(range(len(gts)))
    assert matches.dtype == torch.long and matches.shape == (len(anchors),)


def test_crowd_boxes_make_no_positives_and_ignore_the_anchors_they_cover():
    crowd_box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    person = torch.tensor([[0.75, 0.0, 1.0, 0.25]])
    anchors = torch.tensor([
        [0.0, 0.0, 0.5, 0.5],         # equal to the crowd box: IoU 1, still not a positive
        [0.125, 0.125, 0.25, 0.25],   # wholly inside the crowd box, IoU 1/16
        [0.25, 0.0, 0.75, 0.25],      # half inside: intersection over anchor area exactly 0.5
        [0.375, 0.0, 0.875, 0.25],    # a quarter inside
        [0.75, 0.0, 1.0, 0.25],       # the person
        [0.5, 0.5, 1.0, 1.0],         # outside everything
    ])
    matches = match_anchors(torch.cat((crowd_box, person)), anchors, crowd=torch.tensor([True, False]))
    assert matches.tolist() == [-2, -2, -2, -1, 1, -1]


def test_positive_inside_a_crowd_region_stays_positive():
    crowd_box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    person = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    matches = match_anchors(torch.cat((person, crowd_box)), ANCHORS, crowd=torch.tensor([False, True]))
    assert matches.tolist() == [0, 0, -2, -2]


def test_only_crowd_boxes():
    matches = match_anchors(GT, ANCHORS, crowd=torch.tensor([True]))
    assert matches.tolist() == [-2, -2, -2, -1]


def test_no_gt_means_all_background():
    matches = match_anchors(torch.zeros(0, 4), ANCHORS)
    assert matches.tolist() == [-1, -1, -1, -1] and matches.dtype == torch.long
    assert match_anchors(torch.zeros(0, 4), ANCHORS, crowd=torch.zeros(0, dtype=torch.bool)).tolist() == [-1] * 4
