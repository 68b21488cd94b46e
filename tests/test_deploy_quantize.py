"""Int8 static quantisation: a real QDQ int8 graph, top-1 agreement with fp32 computed on held-out images, and the
agreement of trained demo models gated."""

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from deploy_helpers import PREPROCESS, exported_onnx, quantized_onnx, shapes_images
from test_engine_trainer import DemoRun

from mnv2.deploy.preprocess import Preprocess
from mnv2.deploy.quantize import Agreement, CalibrationReader, quantize_int8, split_calibration, top1_agreement
from mnv2.errors import UserError

# The gate: the demo recipe as shipped (val top-1 ~0.91) keeps >= 98% of its top-1 decisions in int8 on the
# embedded validation images (measured 99.27% on 2,200 held-out shapes images, docs/deploy.md).
FULL_DEMO_MIN_AGREEMENT = 0.98
# The fast suite's 30-epoch demo model (val top-1 ~0.66-0.69) is less decisive, so int8 rounding flips more of its
# close calls: measured 96.18% on 2,200 held-out images (docs/deploy.md) and 96.46% (463 / 480) on the val images
# here; the gate sits a few points below, where a broken calibration (wrong preprocessing, lost per-channel scales:
# agreement near an untrained model's 0.4-0.5) fails it.
SHORT_DEMO_MIN_AGREEMENT = 0.93
CALIB_IMAGES = 200  # `mnv2 export --int8`'s default --calib-images


def _run(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def test_int8_graph_is_quantised_per_channel():
    graph = onnx.load(str(quantized_onnx()))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= 30  # every conv's weights stored as int8
    # per-channel: a conv weight's scale has one entry per output channel
    scales = {t.name: t for t in graph.graph.initializer}
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
          {w.name for w in int8_weights}]
    assert all(int(np.prod(scales[n.input[1]].dims)) > 1 for n in dq)
    assert quantized_onnx().stat().st_size < exported_onnx().stat().st_size / 2.5
    assert any(e.key == "mnv2.int8" for e in graph.metadata_props)


def test_int8_top1_agreement_on_held_out_images():
    """Agreement on the validation images, which calibration never saw. The test model is untrained (random features,
    prototype head; see deploy_helpers): its decisions hang on small feature differences that int8 noise often flips,
    so its agreement is far below a trained model's (measured: 0.4-0.5 here; a trained model's figure is in
    docs/deploy.md). What is asserted: the count is right, and the int8 logits follow the fp32 ones."""
    held_out = shapes_images("val")
    preprocess = Preprocess.from_dict(PREPROCESS)
    fp32, int8 = _run(exported_onnx()), _run(quantized_onnx())
    agreement = top1_agreement(fp32, int8, held_out, preprocess)
    # recount independently, image by image
    x = preprocess(held_out).numpy()
    matches = sum(int(fp32(x[i:i + 1]).argmax() == int8(x[i:i + 1]).argmax()) for i in range(len(x)))
    assert agreement.images == len(held_out) and agreement.matches == matches
    print(f"int8 top-1 agreement with fp32: {agreement.fraction:.3f} on {agreement.images} held-out images")
    # the int8 logits follow the fp32 ones (measured ~0.85 correlation on this model; calibrating with the wrong
    # preprocessing or losing the per-channel scales drops it towards 0)
    a, b = fp32(x), int8(x)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.6


def test_split_calibration_holds_images_out():
    images = [f"img{i}.jpg" for i in range(10)]
    calib, held_out = split_calibration(images, 100)
    assert len(calib) == 5 and len(held_out) == 5  # never more than half calibrates
    assert not set(calib) & set(held_out) and set(calib) | set(held_out) == set(images)
    assert split_calibration(images, 3)[0] == calib[:3]  # seeded: the same images every time
    with pytest.raises(UserError, match="at least 2 images"):
        split_calibration(images[:1], 10)


def test_split_calibration_caps_the_held_out_images():
    """`mnv2 export --int8 --agreement-images N`: a big folder measures agreement on N of its images, a seeded random
    sample of the images calibration did not see."""
    images = [f"img{i}.jpg" for i in range(1000)]
    calib, all_held_out = split_calibration(images, 200)
    calib_capped, held_out = split_calibration(images, 200, heldout_images=500)
    assert calib_capped == calib and len(all_held_out) == 800
    assert len(held_out) == 500 and set(held_out) <= set(all_held_out)
    assert split_calibration(images, 200, heldout_images=5000)[1] == all_held_out  # a cap above the count: all


def demo_int8_agreement(demo: DemoRun, out) -> Agreement:
    """The run's best weights exported and quantised as `mnv2 export --int8` does (percentile calibration on 200
    training images through the weights' own preprocessing), then top-1 agreement with fp32 on every embedded
    validation image (none of which calibrated)."""
    from mnv2.deploy import export_onnx
    from mnv2.weights import load_model

    model, config = load_model(demo.run / "best.safetensors")
    fp32 = export_onnx(model, config, out / "fp32.onnx", dynamic_batch=True).path
    preprocess = Preprocess.from_dict(config["preprocess"])
    train = sorted((demo.data / "train").rglob("*.jpg"))
    calib = random.Random(0).sample(train, CALIB_IMAGES)
    int8 = quantize_int8(fp32, out / "int8.onnx", CalibrationReader.from_images(calib, preprocess))
    val = sorted((demo.data / "val").rglob("*.jpg"))
    agreement = top1_agreement(_run(fp32), _run(int8), val, preprocess)
    assert agreement.images == len(val) == 480
    print(f"int8 top-1 agreement with fp32: {agreement.fraction:.4f} ({agreement.matches}/{agreement.images} val "
          f"images; fp32 val top-1 {demo.best['value']:.3f})")
    return agreement


def test_int8_agreement_of_the_short_demo_model(short_demo_run, tmp_path):
    """The fast suite's trained model (the 30-epoch demo run, shared with test_engine_trainer)."""
    agreement = demo_int8_agreement(short_demo_run, tmp_path)
    assert agreement.fraction >= SHORT_DEMO_MIN_AGREEMENT, agreement


@pytest.mark.slow
def test_int8_agreement_of_the_demo_model_is_at_least_98_percent(full_demo_run, tmp_path):
    """The issue's gate, on the model the demo recipe trains to ~0.91 val top-1 (shared with test_engine_trainer)."""
    agreement = demo_int8_agreement(full_demo_run, tmp_path)
    assert agreement.fraction >= FULL_DEMO_MIN_AGREEMENT, agreement
