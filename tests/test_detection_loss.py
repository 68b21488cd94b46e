import math

import pytest
import torch
from torchvision.ops import box_convert

from mnv2.detection import BoxCoder, encode_targets, multibox_loss

# One image, 6 anchors, 2 classes (3 columns, 0 = background). Anchor 4 is ignored and has the highest loss of all,
# so a loss that counted or mined it would be visibly wrong; its box offsets are far off for the same reason.
LABELS = [2, 0, 0, 0, -1, 0]
LOGITS = [
    [0.5, -1.0, 2.0],
    [-2.0, 1.5, 0.0],
    [3.0, -2.0, -3.0],
    [0.0, 0.5, -0.5],
    [-5.0, 5.0, 5.0],
    [1.0, 0.0, 0.0],
]
DELTAS = [[0.5, -2.0, 0.25, 0.0]] + [[1.0, 1.0, 1.0, 1.0]] * 3 + [[-100.0] * 4] + [[1.0, 1.0, 1.0, 1.0]]
TARGETS = [[0.0, 0.0, 0.5, 1.5]] + [[0.0] * 4] * 3 + [[100.0] * 4] + [[0.0] * 4]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def bce_sum(row, label):
    return sum(-math.log(sigmoid(x)) if c == label else -math.log(1.0 - sigmoid(x)) for c, x in enumerate(row))


def cross_entropy(row, label):
    return math.log(sum(math.exp(x) for x in row)) - row[label]


def smooth_l1(d):
    return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5


def expected_loss(labels, logits, deltas, targets, kind, neg_pos_ratio, min_negatives):
    """The SSD loss by hand: positives + hardest negatives, smooth L1 on positives, divided by the positives."""
    per_anchor = [(bce_sum if kind == "sigmoid" else cross_entropy)(row, max(y, 0)) for row, y in zip(logits, labels)]
    positives = [a for a, y in enumerate(labels) if y > 0]
    negatives = sorted((a for a, y in enumerate(labels) if y == 0), key=lambda a: -per_anchor[a])
    hard = negatives[:max(neg_pos_ratio * len(positives), min_negatives)]
    normaliser = max(1, len(positives))
    cls = sum(per_anchor[a] for a in positives + hard) / normaliser
    loc = sum(smooth_l1(d - t) for a in positives for d, t in zip(deltas[a], targets[a])) / normaliser
    return cls, loc


def run(labels, logits, deltas, targets, dtype=torch.float32, **kwargs):
    return multibox_loss(torch.tensor([logits], dtype=dtype), torch.tensor([deltas], dtype=dtype),
                         torch.tensor([labels]), torch.tensor([targets]), **kwargs)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("neg_pos_ratio, min_negatives", [(3, 3), (1, 0), (0, 2)])
def test_hand_computed_loss(kind, neg_pos_ratio, min_negatives):
    cls, loc = expected_loss(LABELS, LOGITS, DELTAS, TARGETS, kind, neg_pos_ratio, min_negatives)
    out = run(LABELS, LOGITS, DELTAS, TARGETS, kind=kind, neg_pos_ratio=neg_pos_ratio, min_negatives=min_negatives)
    assert out["classification"].item() == pytest.approx(cls, rel=1e-5)
    assert out["localization"].item() == pytest.approx(loc, rel=1e-5)
    assert out["loss"].item() == pytest.approx(cls + loc, rel=1e-5)
    assert loc == pytest.approx(0.125 + 1.5 + 0.03125 + 1.0)


def test_one_negative_per_positive_picks_the_hardest_negative_not_the_ignored_anchor():
    out = run(LABELS, LOGITS, DELTAS, TARGETS, kind="softmax", neg_pos_ratio=1, min_negatives=0)
    hardest = cross_entropy(LOGITS[1], 0)  # anchor 1: background logit -2 against 1.5
    assert out["classification"].item() == pytest.approx(cross_entropy(LOGITS[0], 2) + hardest, rel=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_no_positives_trains_min_negatives_and_divides_by_one(kind):
    labels = [0, 0, 0, 0, -1, 0]
    cls, _ = expected_loss(labels, LOGITS, DELTAS, TARGETS, kind, 3, 3)
    out = run(labels, LOGITS, DELTAS, TARGETS, kind=kind)
    assert out["classification"].item() == pytest.approx(cls, rel=1e-5)
    assert out["localization"].item() == 0.0


def test_ignored_anchors_contribute_nothing():
    # Changing the ignored anchor's logits and offsets to anything leaves the loss unchanged.
    logits = [row[:] for row in LOGITS]
    deltas = [row[:] for row in DELTAS]
    logits[4], deltas[4] = [50.0, -50.0, -50.0], [7.0, 7.0, 7.0, 7.0]
    for kind in ("sigmoid", "softmax"):
        assert run(LABELS, logits, deltas, TARGETS, kind=kind)["loss"].item() == \
            run(LABELS, LOGITS, DELTAS, TARGETS, kind=kind)["loss"].item()


def test_normalised_by_the_positives_of_the_whole_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 4, generator=g)
    deltas, targets = torch.randn(2, 40, 4, generator=g), torch.randn(2, 40, 4, generator=g)
    labels = torch.zeros(2, 40, dtype=torch.long)
    labels[0, 3] = 1                       # 1 positive in image 0
    labels[1, [5, 9, 20]] = torch.tensor([2, 3, 1])  # 3 in image 1
    labels[1, 30] = -1
    batch = multibox_loss(logits, deltas, labels, targets)
    singles = [multibox_loss(logits[i:i + 1], deltas[i:i + 1], labels[i:i + 1], targets[i:i + 1]) for i in range(2)]
    for key in ("classification", "localization"):
        total = singles[0][key] * 1 + singles[1][key] * 3
        assert batch[key].item() == pytest.approx(total.item() / 4, rel=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_bf16_inputs_give_the_float32_result(kind):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, 5, generator=g).bfloat16()
    deltas = torch.randn(2, 30, 4, generator=g).bfloat16()
    targets = torch.randn(2, 30, 4, generator=g)
    labels = torch.randint(0, 5, (2, 30), generator=g)
    labels[labels == 4] = 0
    out = multibox_loss(logits, deltas, labels, targets, kind=kind)
    reference = multibox_loss(logits.float(), deltas.float(), labels, targets, kind=kind)
    for key in ("loss", "classification", "localization"):
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], reference[key])


def test_gradients_flow_only_through_selected_anchors():
    logits = torch.tensor([LOGITS], requires_grad=True)
    deltas = torch.tensor([DELTAS], requires_grad=True)
    run_out = multibox_loss(logits, deltas, torch.tensor([LABELS]), torch.tensor([TARGETS]), neg_pos_ratio=1,
                            min_negatives=0)
    run_out["loss"].backward()
    # Positive 0 and hardest negative 1 only; offsets of the positive only.
    assert logits.grad[0].abs().sum(dim=1).nonzero().flatten().tolist() == [0, 1]
    assert deltas.grad[0].abs().sum(dim=1).nonzero().flatten().tolist() == [0]


def test_encode_targets_labels_and_offsets():
    anchors_xyxy = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.5, 0.125],
                                 [0.5, 0.5, 1.0, 1.0]])
    anchors = box_convert(anchors_xyxy, "xyxy", "cxcywh")
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    targets = [
        {"boxes": gt, "labels": torch.tensor([3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.cat((gt, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))), "labels": torch.tensor([2, 1]),
         "iscrowd": torch.tensor([False, True])},
    ]
    labels, box_targets = encode_targets(targets, anchors, BoxCoder())
    assert labels.tolist() == [[3, 3, 0, 0], [0, 0, 0, 0], [2, 2, -1, -1]]
    # Anchor 0 is the gt itself; anchor 1 has the gt's centre x and width, centre 0.125 lower, half the height.
    expected = torch.zeros(4, 4)
    expected[1] = torch.tensor([0.0, 10 * 0.125 / 0.25, 0.0, 5 * math.log(2.0)])
    torch.testing.assert_close(box_targets[0], expected)
    torch.testing.assert_close(box_targets[2], expected)
    assert box_targets[1].abs().sum() == 0
    assert labels.dtype == torch.long and box_targets.dtype == torch.float32
