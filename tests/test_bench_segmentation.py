"""`mnv2 bench` for a segmentation model: every runner returns the class map of the same shape (ours agreeing with
eager PyTorch), the ONNX class-map graph is the model's upsampling + argmax, torchvision's peers are measured up to
their low-resolution logits, and the t-split lowers the measured peak on the atrous backbone. No timing asserts."""

import argparse
import json

import numpy as np
import pytest
import torch
from deploy_helpers import assert_one_line_error, mnv2_inprocess

from mnv2.bench import memory as M
from mnv2.bench import segmentation as S
from mnv2.bench.memory import measure_peak_activation_bytes
from mnv2.deploy import tsplit
from mnv2.deploy.runtime import is_installed
from mnv2.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

RES, WIDTH = 64, 0.35


@pytest.fixture(scope="module")
def calib():
    return S.synthetic_batch(2, RES, seed=100)


@pytest.fixture(scope="module")
def model():
    return S.ours(WIDTH, bn_images=S.bn_batch(RES))


def test_synthetic_batch_is_normalised_scenes():
    x = S.synthetic_batch(2, RES, seed=0)
    assert x.shape == (2, 3, RES, RES) and x.dtype == torch.float32
    assert -3 < x.mean() < 3 and x.std() > 0.3  # ImageNet-normalised pixels, textured
    assert not torch.equal(x[0], x[1])


def test_logits_at_stride_is_torchvision_forward_before_its_upsampling():
    x = S.synthetic_batch(1, RES, seed=0)
    for builder in S.PEERS.values():
        peer = S.torchvision_peer(builder, S.bn_batch(RES))
        with torch.inference_mode():
            low = S.logits_at_stride(peer)(x)
            full = peer(x)["out"]
        assert low.shape[:2] == (1, S.NUM_CLASSES) and low.shape[-1] < RES, builder
        upsampled = torch.nn.functional.interpolate(low, size=(RES, RES), mode="bilinear", align_corners=False)
        torch.testing.assert_close(upsampled, full, rtol=1e-4, atol=1e-4)


def _check_runners(model, calib, backends):
    peers = {name: S.torchvision_peer(builder, S.bn_batch(RES)) for name, builder in S.PEERS.items()}
    runners = S.build_runners(model, backends, 1, RES, calib, peers)
    names = [*S.PEERS, *backends]
    assert list(runners) == names + [n + S.NETWORK for n in names]
    x = S.synthetic_batch(1, RES, seed=0).numpy()
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).argmax(1).numpy()
        at_stride = model.forward_logits_at_stride(torch.from_numpy(x)).numpy()
    for name in names:
        got = S._as_numpy(runners[name](x))
        assert got.shape == (1, RES, RES), name
        if name == "torch":  # the eager network and the fused class map: exactly the model's argmax
            assert np.array_equal(got, expected)
        if name in S.FP32:
            assert (got == expected).mean() > 0.99, name
        net = S._as_numpy(runners[name + S.NETWORK](x))
        assert net.shape[:2] == (1, S.NUM_CLASSES) and net.shape[-1] < RES, name
        if name in S.FP32:
            np.testing.assert_allclose(net, at_stride, rtol=1e-3, atol=1e-3 * np.abs(at_stride).max())


def test_torch_runners_give_the_models_class_map(model, calib):
    _check_runners(model, calib, ["torch", "torch-fast", S.SPLIT])


@pytest.mark.slow
@pytest.mark.skipif(not is_installed("onnxruntime"), reason="onnxruntime not installed")
def test_onnx_runners_give_the_models_class_map(model, calib):
    _check_runners(model, calib, ["onnxruntime", "onnxruntime-int8"]
                   + (["openvino", "openvino-int8"] if is_installed("openvino") else []))


@pytest.fixture
def quick_peak(monkeypatch):
    """A fixed matmul peak instead of timing 2048^3 products (seconds per run); measured in its own test."""
    from mnv2.bench import floor
    monkeypatch.setattr(floor, "fp32_peaks", lambda threads: {"torch.mm": 100.0, "onnxruntime MatMul": 200.0})


def test_matmul_peaks_are_measured():
    from mnv2.bench import floor
    pytest.importorskip("onnxruntime")
    assert floor.onnxruntime_matmul_gflops(1, n=256, repeats=2) > 0
    peaks = floor.fp32_peaks(1)
    assert set(peaks) == {"torch.mm", "onnxruntime MatMul"} and min(peaks.values()) > 0


def test_measure_returns_every_row_with_positive_times(quick_peak):
    r = S.measure(WIDTH, RES, 1, ["torch", "torch-fast", S.SPLIT], repeats=2)
    names = [*S.PEERS, "torch", "torch-fast", S.SPLIT]
    assert [row["backend"] for row in r["rows"]] == names + [n + S.NETWORK for n in names]
    assert all(0 < row["median_ms"] <= row["p90_ms"] for row in r["rows"])
    ends = [row for row in r["rows"] if row["kind"] == "end-to-end"]
    assert {tuple(row["output_shape"]) for row in ends} == {(1, RES, RES)}
    lraspp, deeplab = S.PEERS
    assert r["rows"][0]["speedup"][lraspp] == 1.0 and r["rows"][1]["speedup"][deeplab] == 1.0
    assert all(row["agreement"] is None for row in ends[:2]) and all(row["agreement"] > 0.99 for row in ends[2:])
    nets = [row for row in r["rows"] if row["kind"] == "network"]
    assert all(row["floor_fraction"] is None for row in nets[:2]) and all(row["floor_fraction"] > 0 for row in nets[2:])
    assert r["madds"] > 0 and r["floor_ms"] == pytest.approx(2 * r["madds"] / 200.0 / 1e6)  # the better peak
    assert set(r["peer_madds"]) == set(S.PEERS) and r["output_stride"] == 16 and not r["aspp"]
    assert "torchvision deeplabv3" in S.format_table(r)


def test_tsplit_lowers_the_measured_peak_on_the_atrous_backbone(model):
    x = S.synthetic_batch(1, 128, seed=0)
    eager = measure_peak_activation_bytes(model.forward_logits_at_stride, x)
    peaks = [measure_peak_activation_bytes(tsplit(model, t).forward_logits_at_stride, x) for t in (2, 4)]
    assert peaks[0] < eager and peaks[1] < peaks[0], (eager, peaks)


def test_torchvision_peer_memory_stops_at_its_low_resolution_logits():
    """With many classes the upsampled logits alone outweigh the whole network up to its low-resolution logits: the
    measured peak is below their size only if the upsampling is left out."""
    classes = 100
    x = torch.randn(1, 3, RES, RES)
    upsampled_bytes = classes * RES * RES * 4
    for builder in S.PEERS.values():
        peer = S.torchvision_peer(builder, num_classes=classes)
        assert measure_peak_activation_bytes(S.logits_at_stride(peer), x) < upsampled_bytes, builder
        assert measure_peak_activation_bytes(peer, x) >= upsampled_bytes, builder


def _args(**kw):
    base = {"model": "deeplabv3_mobilenet_v2", "width": WIDTH, "splits": "1,2", "resolutions": str(RES),
            "repeats": 1, "threads": 1, "json": True}
    base.update(kw)
    return argparse.Namespace(**base)


def test_memory_main_for_deeplab_reports_every_variant_and_the_best_t(capsys):
    assert M.main(_args()) == 0
    report = json.loads(capsys.readouterr().out)
    variants = [r["variant"] for r in report["results"]]
    assert variants == ["torchvision lraspp eager", "torchvision deeplabv3 eager", "ours eager",
                        "ours folded channels_last", "t-split t=1", "t-split t=2"]
    assert all(r["peak_bytes"] > 0 and r["median_ms"] > 0 for r in report["results"])
    (target,) = report["targets"]
    assert target["best_t"] in (1, 2) and target["lowest_peak_t"] == 2
    assert report["meta"]["model"] == "deeplabv3_mobilenet_v2"
    assert "best t =" in M.format_markdown(report)


def test_segmentation_best_t_is_the_fastest_split_meeting_the_target():
    def row(variant, ms, peak):
        return {"resolution": 512, "variant": variant, "median_ms": ms, "peak_bytes": peak}

    rows = [row(M.SEGMENTATION_BASELINE, 200.0, 1200), row("ours eager", 100.0, 2000),
            row("ours folded channels_last", 50.0, 1300), row("t-split t=1", 40.0, 1000),
            row("t-split t=4", 45.0, 390), row("t-split t=8", 42.0, 300), row("t-split t=16", 60.0, 250)]
    (t,) = M._segmentation_targets(rows)
    assert (t["best_t"], t["lowest_peak_t"]) == (8, 16) and t["memory_target_met"]
    assert t["latency_ratio_vs_unsplit"] == pytest.approx(42.0 / 40.0)
    few = rows[:4] + [row("t-split t=4", 45.0, 450)]  # 1200 / 450 < 3: no split meets the target
    (t,) = M._segmentation_targets(few)
    assert t["best_t"] == t["lowest_peak_t"] == 4 and not t["memory_target_met"]
    assert t["peak_ratio_vs_torchvision"] == pytest.approx(1200 / 450)


def test_bench_options_are_user_errors():
    with pytest.raises(UserError, match="mobilenet_v2"):
        M.main(_args(model="deeplabv3_mobilenet_v1"))
    with pytest.raises(UserError, match="unknown backend"):
        S.measure(WIDTH, RES, 1, ["tensorrt"], repeats=1)


def test_bench_cli_dispatches_a_segmentation_model(quick_peak):
    r = mnv2_inprocess("bench", "--model", "deeplabv3_mobilenet_v2", "--width", str(WIDTH), "--resolution",
                       str(RES), "--threads", "1", "--backends", "torch-fast,t-split", "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"] == "deeplabv3_mobilenet_v2" and data["resolution"] == RES
    assert [row["backend"] for row in data["rows"]][:4] == [*S.PEERS, "torch-fast", S.SPLIT]
    assert_one_line_error(mnv2_inprocess("bench", "--model", "deeplabv3_mobilenet_v2", "--backends", "tensorrt"),
                          "unknown backend")
