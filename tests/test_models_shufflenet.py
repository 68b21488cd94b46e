"""ShuffleNet v1 2x, g=3: shapes and parameter count against a hand computation from the ShuffleNet paper's Table 1."""

import pytest
import torch

from mnv2 import create_model
from mnv2.analysis import count_madds, count_params
from mnv2.models.shufflenet import ShuffleNetV1
from mnv2.paper import reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_params(groups: int, stem: int, stages: tuple[int, int, int], classes: int = 1000) -> int:
    """Conv weights + BN (2 per channel) of every unit; mid = stage width / 4; stride-2 branches add out - in."""
    total = 3 * stem * 9 + 2 * stem
    c_in = stem
    for s, (c, n) in enumerate(zip(stages, (4, 8, 4))):
        for i in range(n):
            mid, branch = c // 4, (c - c_in if i == 0 else c)
            g1 = 1 if (s == 0 and i == 0) else groups
            total += c_in * mid // g1 + 2 * mid  # 1x1 group conv
            total += mid * 9 + 2 * mid  # 3x3 depthwise
            total += mid * branch // groups + 2 * branch  # 1x1 group conv
            c_in = c
    return total + c_in * classes + classes


def test_shufflenet_2x_g3_forward_and_param_count():
    model = create_model("shufflenet_v1").eval()  # registry default: 2x, g=3
    # ShuffleNet Table 1, g = 3: stem 24, stages 240 / 480 / 960 at 1x; 2x doubles every width.
    assert count_params(model) == _hand_params(3, 48, (480, 960, 1920))
    with torch.no_grad():
        y = model(torch.randn(2, 3, 224, 224))
        assert y.shape == (2, 1000) and torch.isfinite(y).all()
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1920, 7, 7)


def test_shufflenet_1x_param_count_and_odd_input():
    model = ShuffleNetV1(groups=3, width_mult=1.0, num_classes=10).eval()
    assert count_params(model) == _hand_params(3, 24, (240, 480, 960), classes=10)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 10)


def test_shufflenet_2x_close_to_paper_table4():
    _, paper_params_m, paper_madds_m, _ = reference.TABLE4["ShuffleNet (x2)"]
    model = create_model("shufflenet_v1")
    # 5,450,776 parameters: the paper's "5.4M" (see docs/memory.md); 524.0M multiply-adds.
    assert abs(count_params(model) / 1e6 - paper_params_m) < 0.06
    assert abs(count_madds(model, 224) / 1e6 - paper_madds_m) / paper_madds_m < 0.002


def test_shufflenet_stem_as_the_authors_release_and_1_5x_at_paper_table4():
    """The release keeps the stem at 24 for 1.5x (16 for 0.5x, g = 8); 1.5x then has Table 4's 292M multiply-adds."""
    from mnv2.models.shufflenet import stem_channels

    assert [stem_channels(w, 3) for w in (0.5, 1.0, 1.5, 2.0)] == [12, 24, 24, 48]
    assert [stem_channels(w, 8) for w in (0.5, 1.0, 1.5, 2.0)] == [16, 24, 24, 48]
    model = ShuffleNetV1(groups=3, width_mult=1.5)
    assert model.stem.conv.out_channels == 24
    assert count_params(model) == _hand_params(3, 24, (360, 720, 1440))
    _, paper_params_m, paper_madds_m, _ = reference.TABLE4["ShuffleNet (1.5)"]
    assert abs(count_madds(model, 224) / 1e6 - paper_madds_m) / paper_madds_m < 0.002
    assert abs(count_params(model) / 1e6 - paper_params_m) < 0.06
