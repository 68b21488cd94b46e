import math

import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import box_convert

from mnv2.detection import BoxCoder, ssd_anchors


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 0.7
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.01
    return torch.cat((xy, xy + wh), dim=1)


def test_decode_inverts_encode():
    g = torch.Generator().manual_seed(0)
    anchors = ssd_anchors(128)
    boxes = random_boxes(len(anchors), g)
    coder = BoxCoder()
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-5, rtol=1e-5)


def test_leading_dims_broadcast():
    g = torch.Generator().manual_seed(1)
    anchors = ssd_anchors(128)[:50]
    boxes = random_boxes(2 * 50, g).view(2, 50, 4)
    coder = BoxCoder()
    deltas = coder.encode(boxes, anchors)
    assert deltas.shape == (2, 50, 4)
    torch.testing.assert_close(deltas[1], coder.encode(boxes[1], anchors))
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes, atol=1e-5, rtol=1e-5)


def test_encode_and_decode_equal_torchvision():
    g = torch.Generator().manual_seed(2)
    anchors = ssd_anchors(128)
    anchors_xyxy = box_convert(anchors, "cxcywh", "xyxy")
    boxes = random_boxes(len(anchors), g)
    reference = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0))
    coder = BoxCoder()
    torch.testing.assert_close(coder.encode(boxes, anchors), reference.encode_single(boxes, anchors_xyxy))
    deltas = torch.randn(len(anchors), 4, generator=g)
    torch.testing.assert_close(coder.decode(deltas, anchors), reference.decode_single(deltas, anchors_xyxy))


def test_encode_values_by_hand():
    # Anchor centred (0.5, 0.5), 0.2 x 0.4; box centred (0.52, 0.46), 0.4 x 0.2.
    anchor = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    box = torch.tensor([[0.32, 0.36, 0.72, 0.56]])
    expected = torch.tensor([[10 * 0.02 / 0.2, 10 * -0.04 / 0.4, 5 * math.log(2.0), 5 * math.log(0.5)]])
    torch.testing.assert_close(BoxCoder().encode(box, anchor), expected)


def test_huge_dw_does_not_overflow():
    anchor = torch.tensor([[0.5, 0.5, 0.1, 0.2]])
    deltas = torch.tensor([[0.0, 0.0, 1e4, 1e30]])
    boxes = BoxCoder().decode(deltas, anchor)
    assert torch.isfinite(boxes).all()
    w, h = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    # Clamped at log(1000 / 16): at most 62.5 times the anchor.
    assert abs(w.item() - 6.25) < 1e-4
    assert abs(h.item() - 12.5) < 1e-4


def test_bf16_deltas_decode_in_float32():
    anchors = ssd_anchors(128)[:8]
    deltas = torch.tensor([[0.25, -0.5, 0.75, 1.0]] * 8)
    coder = BoxCoder()
    out = coder.decode(deltas.bfloat16(), anchors)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, coder.decode(deltas, anchors))
