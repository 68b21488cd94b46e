"""`mnv2 bench` for a detector: the runners detect what DetectionPredictor detects, both detectors get the NMS work
asked for (checked against the post-processing itself), the torchvision peer detects, and the JSON has its rows.
No timing asserts."""

import json

import numpy as np
import pytest
import torch
from deploy_helpers import assert_one_line_error, mnv2_cli, mnv2_inprocess

from mnv2.bench import detection as D
from mnv2.bench.latency import time_runners
from mnv2.deploy.detect import DetectionPredictor
from mnv2.deploy.export_detection import DetectorSpec
from mnv2.deploy.runtime import is_installed

RES, CLASSES, BOXES = 96, 8, 60


@pytest.fixture(scope="module")
def scenes():
    return D.bench_image(), D.calibration_images(4, size=RES)


@pytest.fixture(scope="module")
def detector(scenes):
    image, calib = scenes
    return D.ours(0.35, RES, CLASSES, calib, image, BOXES, D.DEPLOY_THRESHOLD)


@pytest.fixture(scope="module")
def peer(scenes):
    image, calib = scenes
    return D.torchvision_peer(calib[:2], image, BOXES)


def _x(config, image):
    return DetectorSpec.from_config(config, CLASSES).preprocess([image])


def test_bench_image_is_a_640x480_photo_like_scene(scenes):
    image, calib = scenes
    assert image.size == D.IMAGE_SIZE and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.std() > 20  # textured, not flat
    assert all(im.size == (RES, RES) for im in calib)
    assert not np.array_equal(np.asarray(calib[0]), np.asarray(calib[1]))


def test_our_nms_boxes_is_what_select_detections_sends_to_nms(detector, scenes):
    model, config = detector
    spec = DetectorSpec.from_config(config, CLASSES)
    with torch.inference_mode():
        cls_logits, box_deltas = model(_x(config, scenes[0]))
    counted = D.our_nms_boxes(cls_logits[0], spec.score_threshold)
    # the calibration reached the workload asked for
    assert abs(counted - BOXES) <= 0.05 * BOXES
    # NMS that suppresses nothing (IoU > 1 never happens) keeps exactly the boxes that entered it
    from mnv2.detection import select_detections
    *_, count = select_detections(cls_logits, box_deltas, spec.anchors(), spec.kind, spec.score_threshold,
                                  iou_threshold=1.0, max_detections=10_000)
    assert int(count[0]) == counted
    # and the scores are spread, not the ties of a fresh head
    assert len(torch.unique(cls_logits[0, :, 1:].sigmoid())) > 100


def test_torchvision_peer_gets_the_same_nms_work_and_detects(peer, scenes):
    image = scenes[0]
    with torch.inference_mode():
        logits = D._TvNetwork(peer)(peer.transform([D._to_tensor(image)])[0].tensors)[0]
    counted = D.tv_nms_boxes(logits, peer.score_thresh, peer.topk_candidates)
    assert abs(counted - BOXES) <= 0.05 * BOXES
    assert (peer.score_thresh, peer.nms_thresh, peer.detections_per_img) == (0.001, 0.55, 300)  # its defaults
    out = D.torchvision_runner(peer)(image)
    assert 0 < len(out["boxes"]) <= counted
    assert out["boxes"][:, 2].max() > D.IMAGE_SIZE[1]  # in the 640x480 image's pixels, not the 320 input's
    nms_thresh, per_img = peer.nms_thresh, peer.detections_per_img
    try:  # NMS that suppresses nothing returns every box that entered it
        peer.nms_thresh, peer.detections_per_img = 1.0, 100_000
        assert len(D.torchvision_runner(peer)(image)["boxes"]) == counted
    finally:
        peer.nms_thresh, peer.detections_per_img = nms_thresh, per_img


def _check_runners(detector, scenes, backends):
    model, config = detector
    image, calib = scenes
    x = _x(config, image)
    runners = D.build_runners(model, config, backends, 1, calib, image)
    outside = [f"{b}{D.TORCH_NMS}" for b in backends if not b.startswith("torch")]
    networks = [b for b in backends if b in D.FP32_BACKENDS or b.endswith("-int8")]
    assert sorted(runners) == sorted(backends + outside + [f"{b} (network)" for b in networks] + list(D.STAGES))
    expected = DetectionPredictor.from_model(model, config, backend="torch").predict_images([image])[0]
    assert len(expected) >= 5  # something to compare
    for name in [b for b in backends + outside if "int8" not in b]:  # NMS in the graph or in torch: same detections
        got = runners[name](image)[0]
        assert [d.label for d in got] == [d.label for d in expected], name
        assert np.abs(np.subtract([d.box for d in got], [d.box for d in expected])).max() < 0.05, name  # pixels
        assert np.abs(np.subtract([d.score for d in got], [d.score for d in expected])).max() < 1e-4, name
    pixels = runners[D.STAGES[0]](image)
    assert pixels.shape == (1, x.shape[2], x.shape[3], 3) and pixels.dtype == np.uint8
    assert torch.equal(runners[D.STAGES[1]](image), x)
    assert int(runners[D.STAGES[2]](image)[3][0]) == len(expected)  # decode + NMS alone: the same detections
    with torch.inference_mode():
        heads = [h.numpy() for h in model(x)]
    for name in networks:
        got = runners[f"{name} (network)"](image)
        assert [o.shape for o in got] == [h.shape for h in heads]
        if name in D.FP32_BACKENDS:
            assert np.abs(got[0] - heads[0]).max() < 1e-3 * max(1.0, np.abs(heads[0]).max())
        else:  # the int8 network is this model quantised: its class logits follow the fp32 ones (correlation 0.81
            # measured for this random width-0.35 model calibrated on 4 scenes; another network's would be ~0)
            assert np.corrcoef(got[0].ravel(), heads[0].ravel())[0, 1] > 0.5, name


def test_torch_runners_detect_what_detection_predictor_detects(detector, scenes):
    _check_runners(detector, scenes, ["torch", "torch-fast"])


@pytest.mark.slow
@pytest.mark.skipif(not is_installed("onnxruntime"), reason="onnxruntime not installed")
def test_onnx_runners_detect_what_detection_predictor_detects(detector, scenes):
    # one export of the graph with NMS inside, another of the network alone (raw)
    _check_runners(detector, scenes, ["onnxruntime", "onnxruntime-int8"]
                   + (["openvino"] if is_installed("openvino") else []))


def test_time_runners_on_a_given_input_without_throughput():
    calls = []
    result = time_runners({"a": calls.append}, 32, 1, repeats=4, warmup=1, rounds=2, settle=0.0,
                          inputs=("image", None))
    assert set(calls) == {"image"}
    assert result["a"]["images_per_s"] is None and len(result["a"]["round_ms"]) == 2


@pytest.mark.slow
def test_bench_cli_json_for_a_detector():
    r = mnv2_cli("bench", "--model", "ssdlite_mobilenet_v2", "--width", "0.35", "--resolution", str(RES),
                 "--threads", "1", "--backends", "torch-fast", "--repeats", "2", "--nms-boxes", "200", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [row["backend"] for row in data["rows"]] == ["torchvision", "torch-fast", "torch-fast (network)",
                                                         *D.STAGES]
    assert [row["kind"] for row in data["rows"]] == ["end-to-end", "end-to-end", "network", "stage", "stage",
                                                      "stage"]
    base, ours, net = data["rows"][:3]
    assert base["speedup"] == 1.0 and ours["speedup"] > 0 and net["speedup"] is None
    assert 0 < net["floor_fraction"] and data["floor_ms"] > 0
    assert 0 < ours["detections"] <= 100 and 0 < base["detections"] <= 300
    assert all(0 < row["median_ms"] <= row["p90_ms"] for row in data["rows"])
    workload = data["workload"]
    assert abs(workload["ours"]["nms_boxes"] - 200) <= 10 and abs(workload["torchvision"]["nms_boxes"] - 200) <= 10
    assert workload["ours"]["score_threshold"] == D.DEPLOY_THRESHOLD
    assert data["madds"] > 0 and data["image"] == list(D.IMAGE_SIZE)


def test_bench_cli_detector_errors():
    assert_one_line_error(mnv2_inprocess("bench", "--model", "ssdlite_mobilenet_v2", "--nms-boxes", "0"),
                          "--nms-boxes")
    assert_one_line_error(mnv2_inprocess("bench", "--model", "ssdlite_mobilenet_v2", "--score-threshold", "1.5"),
                          "--score-threshold")
    assert_one_line_error(mnv2_inprocess("bench", "--model", "ssdlite_mobilenet_v2", "--backends", "tensorrt"),
                          "unknown backend")
