"""Peak activation memory read from the allocator's events (paper section 5.1 measured, not estimated)."""

import argparse
import itertools

import pytest
import torch
import torchvision

from mnv2 import create_model
from mnv2.bench.memory import main, measure_peak_activation_bytes
from mnv2.deploy import tsplit
from mnv2.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_peak_of_known_allocations():
    x = torch.randn(1000)  # 4,000 bytes, allocated before the measurement: not counted
    assert measure_peak_activation_bytes(torch.neg, x) == 4000
    # neg and exp both alive while their product is written: three 4,000-byte tensors at the peak.
    assert measure_peak_activation_bytes(lambda v: torch.neg(v) * torch.exp(v), x) == 12000

    def sequential(v):
        a = torch.neg(v)
        del a  # freed before the next allocation: the peak stays one tensor
        return torch.exp(v)

    assert measure_peak_activation_bytes(sequential, x) == 4000


def test_measured_peak_falls_as_t_grows():
    model = create_model("mobilenet_v2").eval()
    x = torch.randn(1, 3, 128, 128)
    peaks = [measure_peak_activation_bytes(tsplit(model, t), x) for t in (1, 2, 4, 6)]
    assert all(a > b for a, b in itertools.pairwise(peaks)), peaks
    eager = measure_peak_activation_bytes(torchvision.models.mobilenet_v2().eval(), x)
    assert eager / peaks[2] >= 3  # issue target at t = 4: at least 3x below torchvision's eager forward


def _args(**kw):
    base = {"model": "mobilenet_v2", "width": 1.0, "splits": "1,2", "resolutions": "64", "repeats": 1, "threads": 1,
            "json": False}
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw, message", [({"splits": "1,x"}, "--splits"), ({"resolutions": "16"}, "--resolutions"),
                                         ({"model": "mobilenet_v1"}, "mobilenet_v2 only")])
def test_bad_options_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        main(_args(**kw))


def test_main_reports_every_variant(capsys):
    assert main(_args(json=True)) == 0
    import json
    report = json.loads(capsys.readouterr().out)
    variants = [r["variant"] for r in report["results"]]
    assert variants == ["torchvision eager", "folded", "folded channels_last", "t-split t=1", "t-split t=2"]
    assert all(r["peak_bytes"] > 0 and r["median_ms"] > 0 for r in report["results"])


def test_latency_target_is_taken_against_the_fastest_unsplit_run():
    """The split's baseline includes the executor at t = 1: a fast kernel must not make a slow split look cheap."""
    from mnv2.bench.memory import _targets

    def row(variant, ms, peak=1000):
        return {"resolution": 224, "variant": variant, "median_ms": ms, "peak_bytes": peak}

    rows = [row("torchvision eager", 12.0, 4000), row("folded", 10.0), row("folded channels_last", 9.0),
            row("t-split t=1", 6.0), row("t-split t=4", 6.9)]
    (t,) = _targets(rows)
    assert t["latency_ratio_vs_unsplit"] == pytest.approx(6.9 / 6.0) and not t["latency_target_met"]
    assert t["peak_ratio_vs_torchvision"] == 4.0 and t["memory_target_met"]
    (t,) = _targets([r for r in rows if r["variant"] != "t-split t=1"])  # without t = 1: the folded model
    assert t["latency_ratio_vs_unsplit"] == pytest.approx(6.9 / 9.0) and t["latency_target_met"]
