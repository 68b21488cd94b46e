"""Detectors through ONNX, onnxruntime and OpenVINO: the graph takes the resized uint8 pixels and normalises them as
the eval preset does, decode + NMS in the graph equal PyTorch's post-processing, raw heads equal the model's, int8
keeps normalisation and NMS in fp32 and reports COCO AP, a graph exported before the pixel input still predicts, and
`mnv2 predict` lists the same boxes on every backend.

The detector is seeded, not trained: SSDLite 0.35 @ 64 px with BN statistics from the shapes images and class-head
weights scaled so its scores spread over (0, 1) and differ between images and anchors (a fresh model scores every
anchor 0.01, all ties), which is what a parity test needs; a few boxes per image pass 0.3.
"""

import functools
import importlib.util
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from deploy_helpers import assert_one_line_error, mnv2_inprocess

import mnv2
from mnv2.bench.latency import set_bn_statistics
from mnv2.data.coco import CocoDetection, find_coco_split
from mnv2.data.detection_transforms import detection_eval_preset
from mnv2.data.synthetic import write_dataset
from mnv2.deploy.detect import DetectionPredictor
from mnv2.deploy.export_detection import (
    DETECTION_OUTPUTS,
    PIXELS_NAME,
    RAW_OUTPUTS,
    DetectorSpec,
    compare_detections,
    export_detector,
    join_detection_parts,
    split_detection_graph,
)
from mnv2.deploy.runtime import Predictor, inspect_onnx
from mnv2.detection import postprocess, ssd_anchors
from mnv2.errors import UserError
from mnv2.eval.coco import coco_evaluate, to_coco_results
from mnv2.weights import save_model

RES = 64
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The shapes detection set (8 train, 2 val images of 64 px) and a COCO-layout folder whose val split is the 8
    training images: a val set big enough for AP."""
    tmp = tmp_path_factory.mktemp("detdata")
    root = write_dataset(tmp / "shapes", "detect", images=10, size=64)
    val = tmp / "val"
    shutil.copytree(root / "images", val / "images")
    (val / "annotations").mkdir()
    shutil.copy(root / "annotations" / "instances_train.json", val / "annotations" / "instances_val.json")
    return root, val


@functools.cache
def _detector(root):
    dataset = CocoDetection(*find_coco_split(root, "train"), transform=detection_eval_preset(RES))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mnv2.create_model("ssdlite_mobilenet_v2", width_mult=0.35, num_classes=8, image_size=RES)
    set_bn_statistics(model, x)
    with torch.no_grad():
        # Channels that are dead on 8 images get variances of 1e-11, and BN then multiplies float32 rounding by
        # 3e5: the eager float32 model itself would be 5e-4 off its float64 self. A floor keeps it well conditioned.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.clamp_(min=1e-2)
        for head in model.cls_heads:
            head.pred.weight.mul_(20.0)
            head.pred.bias.fill_(-5.0)
        for head in model.box_heads:
            head.pred.weight.mul_(10.0)
    kwargs = {"width_mult": 0.35, "num_classes": 8, "image_size": RES}
    config = {"model": "ssdlite_mobilenet_v2", "model_kwargs": kwargs, "task": "detection",
              "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resolution": RES,
                             "resize": "stretch", "interpolation": "bilinear"},
              "postprocess": {"kind": "sigmoid", "score_threshold": 1e-8, "iou_threshold": 0.6,
                              "max_detections": 100, "anchor_layout": "tf"},
              "class_names": list(dataset.class_names), "category_ids": list(dataset.category_ids)}
    return model.eval(), config


@pytest.fixture(scope="module")
def detector(data):
    return _detector(data[0])


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory):
    model, config = detector
    return export_detector(model, config, tmp_path_factory.mktemp("det") / "det.onnx")  # batch 1: 2x faster


@pytest.fixture(scope="module")
def run_dir(detector, tmp_path_factory):
    model, config = detector
    run = tmp_path_factory.mktemp("detrun") / "run"
    save_model(run / "best.safetensors", model, config["model"], config["model_kwargs"],
               **{k: v for k, v in config.items() if k not in ("model", "model_kwargs")})
    return run


def _images(root):
    return sorted((root / "images").glob("*.jpg"))


def _batch(root, config):
    spec = DetectorSpec.from_config(config, 8)
    return spec, spec.preprocess(_images(root))


def _pixels(root, config):
    """The exported graphs' input for the same images: uint8 [N, R, R, 3]."""
    return DetectorSpec.from_config(config, 8).preprocess.pixels(_images(root))


def _run(session, pixels):
    """A batch-1 graph over each image of `pixels` in turn, its outputs concatenated."""
    return [np.concatenate(o) for o in zip(*(session.run(None, {PIXELS_NAME: pixels[i:i + 1]})
                                             for i in range(len(pixels))))]


def _pixel_ops(graph) -> list[str]:
    return [n.op_type for n in graph.graph.node if n.name.startswith("pixels/")]


def test_nms_graph_gives_pytorchs_detections_on_images(data, detector, exported):
    model, config = detector
    spec, x = _batch(data[0], config)
    with torch.inference_mode():
        expected = spec.select(*model(x))
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    got = _run(session, _pixels(data[0], config))
    assert [o.name for o in session.get_outputs()] == list(DETECTION_OUTPUTS)
    assert got[0].shape == (10, 100, 4) and got[1].shape == got[2].shape == (10, 100) and got[3].shape == (10,)
    box_diff, score_diff, n = compare_detections(expected, got, 1e-4, "test")
    assert n == int(expected[3].sum()) > 0 and box_diff <= 1e-4 and score_diff <= 1e-4
    # detections that mean something: several classes, scores spread, boxes inside the image, padding zeroed
    boxes, scores, labels, count = got
    kept = np.arange(100)[None, :] < count[:, None]
    assert len(np.unique(labels[kept])) >= 4 and scores[kept].std() > 0.05 and (scores[kept] > 0.3).any()
    assert (boxes[kept] >= 0).all() and (boxes[kept] <= 1).all()
    assert (scores[~kept] == 0).all() and (labels[~kept] == 0).all()
    assert exported.check.max_abs_diff <= 1e-4 * exported.check.max_abs_output and exported.check.detections > 0


def test_nms_graph_scales_to_original_pixels_as_postprocess(data, detector, exported):
    """The normalised boxes times each image's own size are `postprocess`'s pixel boxes (here the images are 64 px
    but pretend to be 480 x 640 and 300 x 200: a stretched resize maps back by scaling)."""
    model, config = detector
    _, x = _batch(data[0], config)
    x = x[:2]
    sizes = [(480, 640), (300, 200)]
    with torch.inference_mode():
        expected = postprocess(*model(x), ssd_anchors(RES), sizes)
    boxes, _, labels, count = _run(ort.InferenceSession(str(exported.path)), _pixels(data[0], config)[:2])
    for i, (h, w) in enumerate(sizes):
        n = int(count[i])
        assert labels[i, :n].tolist() == expected[i]["labels"].tolist()
        np.testing.assert_allclose(boxes[i, :n] * [w, h, w, h], expected[i]["boxes"].numpy(), atol=1e-4 * 640)


def test_graph_structure_and_metadata(exported, detector):
    _, config = detector
    graph = onnx.load(str(exported.path))
    ops = {n.op_type for n in graph.graph.node}
    assert "NonMaxSuppression" in ops and "Conv" in ops
    # uint8 pixels in; the one BatchNormalization is their normalisation, the network's are folded into its convs
    image = graph.graph.input[0]
    assert image.name == PIXELS_NAME and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in image.type.tensor_type.shape.dim] == [1, RES, RES, 3]
    assert _pixel_ops(graph) == ["Transpose", "Cast", "BatchNormalization"]
    assert [n.op_type for n in graph.graph.node].count("BatchNormalization") == 1
    meta = {e.key: json.loads(e.value) for e in graph.metadata_props}
    assert meta["mnv2.task"] == "detection"
    assert meta["mnv2.class_names"] == config["class_names"] and meta["mnv2.category_ids"] == config["category_ids"]
    assert meta["mnv2.preprocess"]["resize"] == "stretch" and meta["mnv2.preprocess"]["resolution"] == RES
    assert meta["mnv2.postprocess"] == {**config["postprocess"], "in_graph": True}
    _, info, (batch, h, w), num_classes = inspect_onnx(exported.path)  # recognised, not a broken classifier
    assert (batch, h, w, num_classes) == (1, RES, RES, 8) and info["mnv2.task"] == "detection"
    with pytest.raises(UserError, match="a detector"):
        Predictor.from_onnx(exported.path)


def test_raw_export_equals_the_model(data, detector, exported, tmp_path):
    model, config = detector
    report = export_detector(model, config, tmp_path / "raw.onnx", raw=True)
    _, x = _batch(data[0], config)
    pixels = _pixels(data[0], config)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(RAW_OUTPUTS)
    with torch.inference_mode():
        for i in range(3):  # a static batch of one
            expected = model(x[i:i + 1])
            got = session.run(None, {PIXELS_NAME: pixels[i:i + 1]})
            for e, g in zip(expected, got, strict=True):
                assert g.shape == e.shape and np.abs(g - e.numpy()).max() <= 1e-4 * max(1, np.abs(e.numpy()).max())
    graph = onnx.load(str(report.path))
    assert "NonMaxSuppression" not in {n.op_type for n in graph.graph.node}
    assert _pixel_ops(graph) == ["Transpose", "Cast", "BatchNormalization"]
    # a raw file still predicts: the predictor runs the post-processing on its heads
    raw, full = (DetectionPredictor.from_onnx(p) for p in (report.path, exported.path))
    images = _images(data[0])[:3]
    from_raw, from_full = raw.predict(images), full.predict(images)
    assert [len(d) for d in from_raw] == [len(d) for d in from_full] and sum(map(len, from_raw)) > 0
    for a, b in zip((d for ds in from_raw for d in ds), (d for ds in from_full for d in ds)):
        assert (a.label, a.name, a.category_id) == (b.label, b.name, b.category_id)
        assert np.abs(np.subtract(a.box, b.box)).max() <= 1e-3 and abs(a.score - b.score) <= 1e-5


def test_failed_check_writes_nothing(detector, tmp_path):
    model, config = detector
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(UserError, match="differs from PyTorch.*not written"):
        export_detector(model, config, out, raw=True, atol=-1.0)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["keep.onnx"]


def test_compare_detections_tells_a_wrong_label():
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]], np.float32)
    expected = (boxes, np.array([[0.9, 0.0]], np.float32), np.array([[2, 0]]), np.array([1]))
    compare_detections(expected, expected, 0.0, "same")
    with pytest.raises(UserError, match="labels differ"):
        compare_detections(expected, (boxes, expected[1], np.array([[3, 0]]), np.array([1])), 1e-4, "x")
    with pytest.raises(UserError, match="boxes differ"):
        compare_detections(expected, (boxes + 1e-3, *expected[1:]), 1e-4, "x")


def _predict_json(*args):
    r = mnv2_inprocess("predict", *map(str, args), "--json", "--score-threshold", "0.3")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _same_detections(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [d["label"] for d in x["detections"]] == [d["label"] for d in y["detections"]]
        for dx, dy in zip(x["detections"], y["detections"]):
            assert np.abs(np.subtract(dx["box"], dy["box"])).max() <= 0.02  # pixels, rounded to 0.01
            assert abs(dx["score"] - dy["score"]) <= 2e-4 and dx["category_id"] == dy["category_id"]


def test_predict_lists_the_same_detections_on_every_backend(data, run_dir, exported, tmp_path):
    images = _images(data[0])[:4]
    torch_ = _predict_json("--run", run_dir, "--backend", "torch", *images)
    assert sum(len(e["detections"]) for e in torch_) >= 4  # something to compare
    backends = [("--onnx", exported.path), ("--run", run_dir, "--backend", "onnxruntime")]
    if HAS_OPENVINO:
        backends.append(("--onnx", exported.path, "--backend", "openvino"))
    for i, source in enumerate(backends):
        got = _predict_json(*source, *images, "--out", tmp_path / f"drawn{i}")
        assert got[0]["backend"] == (source[-1] if source[-2] == "--backend" else "onnxruntime")
        _same_detections(torch_, got)
        assert all(e["drawn"] for e in got)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_backend_from_a_run(data, run_dir):
    images = _images(data[0])[:3]
    _same_detections(_predict_json("--run", run_dir, "--backend", "torch-fast", *images),
                     _predict_json("--run", run_dir, "--backend", "openvino", *images))


def test_int8_export_reports_fp32_and_int8_ap(data, detector, run_dir, tmp_path):
    root, val = data
    out = tmp_path / "int8.onnx"
    r = mnv2_inprocess("export", "--run", str(run_dir), "--out", str(out), "--int8", "--calib", str(root / "images"),
                       "--val-data", str(val), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ap = report["ap"]
    assert report["val_images"] == 8 and "fp32" in ap and "onnxruntime-int8" in ap
    for name, m in ap.items():
        assert 0 <= m["AP50"] <= 1 and 0 <= m["AP"] <= m["AP50"]
        if name != "fp32":
            assert report["ap_drop"][name]["AP"] == pytest.approx(ap["fp32"]["AP"] - m["AP"])
    # the fp32 number is `mnv2 eval`'s: PyTorch + postprocess + COCOeval on the same split
    model, config = detector
    dataset = CocoDetection(*find_coco_split(val, "val"), transform=detection_eval_preset(RES),
                            category_ids=config["category_ids"])
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        dets = postprocess(*model(x), ssd_anchors(RES), [dataset[i][1]["orig_size"] for i in range(len(dataset))])
    expected, _ = coco_evaluate(dataset.coco, to_coco_results(dict(zip(dataset.image_ids, dets)),
                                                              dataset.category_ids), dataset.image_ids)
    assert expected["AP50"] > 0  # the seeded detector hits some objects: AP that can drop
    assert ap["fp32"]["AP"] == pytest.approx(expected["AP"], abs=2e-3)
    graph = onnx.load(str(out))
    post = [n for n in graph.graph.node if n.name.startswith("post/")]
    assert "NonMaxSuppression" in {n.op_type for n in post}
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in post)  # NMS stays fp32
    assert _pixel_ops(graph) == ["Transpose", "Cast", "BatchNormalization"]  # so does the normalisation
    assert graph.graph.input[0].name == PIXELS_NAME
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    meta = {e.key: json.loads(e.value) for e in graph.metadata_props}
    assert meta["mnv2.int8"]["ap"]["fp32"]["AP"] == ap["fp32"]["AP"]
    detections = DetectionPredictor.from_onnx(out, backend="onnxruntime-int8").predict(_images(root)[:2])
    assert any(detections)


def test_bad_detector_export_arguments_are_one_line(data, run_dir, tmp_path):
    root, _ = data
    r = mnv2_inprocess("export", "--run", str(run_dir), "--out", str(tmp_path / "a.onnx"), "--int8", "--calib",
                       str(root / "images"), "--val-data", str(tmp_path / "nowhere"))
    assert_one_line_error(r, "no COCO 'val' split found", str(tmp_path / "nowhere"))
    r = mnv2_inprocess("export", "--run", str(run_dir), "--out", str(tmp_path / "a.onnx"), "--val-data", str(root))
    assert_one_line_error(r, "--val-data", "--int8")
    r = mnv2_inprocess("export", "--model", "ssdlite_mobilenet_v2", "--out", str(tmp_path / "a.onnx"))
    assert_one_line_error(r, "--model ssdlite_mobilenet_v2", "--run")
    assert list(tmp_path.iterdir()) == []


def test_dynamic_batch_graph_detects_each_image_as_alone(data, detector, exported, tmp_path):
    model, config = detector
    dynamic = export_detector(model, config, tmp_path / "dyn.onnx", dynamic_batch=True)
    assert dynamic.check.detections > 0  # the check ran the post-processing at batch 1 and 3
    pixels = _pixels(data[0], config)
    batched = ort.InferenceSession(str(dynamic.path)).run(None, {PIXELS_NAME: pixels})
    alone = _run(ort.InferenceSession(str(exported.path)), pixels)
    compare_detections(alone, batched, 1e-4, "batch of 10 vs one by one")


def test_pixels_are_the_eval_presets_resize_and_the_graph_normalises_them_as_it_does(data, detector, exported):
    _, config = detector
    spec, x = _batch(data[0], config)
    pixels = _pixels(data[0], config)
    assert pixels.dtype == np.uint8 and pixels.shape == (10, RES, RES, 3)
    # the eval preset is this resize, then to float and normalised (torchvision's ToDtype + Normalize)
    mean, std = torch.tensor(spec.preprocess.mean), torch.tensor(spec.preprocess.std)
    by_hand = (torch.from_numpy(pixels).float() / 255 - mean) / std
    assert torch.allclose(by_hand.permute(0, 3, 1, 2), x, atol=1e-6)
    # the graph's own first part does the same
    parts = split_detection_graph(onnx.load(str(exported.path)))
    normalised = _run(ort.InferenceSession(parts.pixels.SerializeToString()), pixels)[0]
    assert np.abs(normalised - x.numpy()).max() <= 1e-5 and exported.check.max_pixel_diff <= 1e-5


def test_a_graph_exported_before_the_pixel_input_still_predicts(data, exported, tmp_path):
    """Input "input", the normalised float batch [N, 3, R, R]: the predictor feeds what the graph takes."""
    graph = onnx.load(str(exported.path))
    parts = split_detection_graph(graph)
    old = join_detection_parts(parts._replace(pixels=None))
    old.metadata_props.extend(graph.metadata_props)
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert old.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # a pixel input of the wrong type is one line naming the file, not a silent cast of every image
    bad = onnx.load(str(exported.path))
    bad.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(UserError, match=r"bad.onnx: input 'image' is float32 \[1, 64, 64, 3\], not a batch of uint8"):
        DetectionPredictor.from_onnx(tmp_path / "bad.onnx")
    images = _images(data[0])[:4]
    predictors = [DetectionPredictor.from_onnx(p) for p in (tmp_path / "old.onnx", exported.path)]
    assert [p.backend.input_dtype for p in predictors] == [np.float32, np.uint8]
    before, now = (p.predict(images) for p in predictors)
    assert [len(d) for d in before] == [len(d) for d in now] and sum(map(len, now)) > 0
    for a, b in zip((d for ds in before for d in ds), (d for ds in now for d in ds)):
        assert a.label == b.label and np.abs(np.subtract(a.box, b.box)).max() <= 1e-3
        assert abs(a.score - b.score) <= 1e-5
