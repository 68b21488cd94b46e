"""`mnv2 export` end to end in a subprocess: a verified ONNX file, an int8 file with its agreement, one-line errors."""

import json
import stat

import numpy as np
import onnx
import onnxruntime as ort
import torch
from deploy_helpers import (
    CLASS_NAMES,
    assert_one_line_error,
    discriminative_model,
    mnv2_cli,
    mnv2_inprocess,
    shapes_dir,
)

from mnv2.deploy.runtime import INT8_BACKENDS, is_installed
from mnv2.weights import save_model


def _weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(path, discriminative_model(), "mobilenet_v2", {"width_mult": 0.35, "num_classes": 8},
               class_names=CLASS_NAMES, preprocess={"resolution": 64, "crop_fraction": 1.0})
    return path


def test_export_weights_to_onnx_matches_pytorch(tmp_path):
    out = tmp_path / "model.onnx"
    r = mnv2_cli("export", "--weights", str(_weights(tmp_path)), "--format", "onnx", "--dynamic-batch",
                 "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["resolution"] == 64 and report["dynamic_batch"] and report["opset"] >= 17
    x = torch.randn(2, 3, 64, 64)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.inference_mode():
        expected = discriminative_model()(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    meta = {e.key: json.loads(e.value) for e in onnx.load(str(out)).metadata_props}
    assert meta["mnv2.class_names"] == CLASS_NAMES


def test_export_int8_reports_agreement_on_held_out_images(tmp_path, umask_027):
    """Calibrated on 16 images; agreement measured on at most --agreement-images of the other 48; the file's mode is
    the umask's (0640 here), as for any file mnv2 writes."""
    out = tmp_path / "int8.onnx"
    calib = shapes_dir()
    assert len(list(calib.rglob("*.jpg"))) - 16 > 20
    r = mnv2_inprocess("export", "--weights", str(_weights(tmp_path)), "--int8", "--calib", str(calib),
                       "--calib-images", "16", "--agreement-images", "20", "--dynamic-batch", "--out", str(out),
                       "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["calib_images"] == 16 and report["heldout_images"] == 20
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    by_backend = report["agreement_by_backend"]
    assert set(by_backend) == {b for b in INT8_BACKENDS if is_installed(b)}
    assert all(0.0 <= a <= 1.0 for a in by_backend.values())
    assert report["agreement"] == by_backend["onnxruntime-int8"]
    graph = onnx.load(str(out))
    assert "QuantizeLinear" in {n.op_type for n in graph.graph.node}
    info = {e.key: json.loads(e.value) for e in graph.metadata_props}["mnv2.int8"]
    assert info["top1_agreement_by_backend"] == by_backend and info["calib_images"] == 16
    assert info["heldout_images"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "model.json", "model.safetensors"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    weights = _weights(tmp_path)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--weights", str(tmp_path / "nope.safetensors")], "no such weights file"),
        (["--weights", str(corrupt)], str(corrupt)),
        (["--run", str(tmp_path)], "no best.safetensors"),
        (["--weights", str(weights), "--int8"], "--int8 needs --calib"),
        (["--weights", str(weights), "--int8", "--calib", str(empty)], "no image files"),
        (["--weights", str(weights), "--opset", "12"], "opset must be at least 17"),
        (["--weights", str(weights), "--int8", "--calib", str(empty), "--agreement-images", "0"],
         "--agreement-images must be at least 1"),
    ]
    for i, (args, fragment) in enumerate(cases):
        # two as the user runs them (fresh interpreter, console output), the rest through the same entry point
        r = (mnv2_cli if i < 2 else mnv2_inprocess)("export", *args, "--out", str(out))
        assert_one_line_error(r, fragment)
        assert out.read_bytes() == b"keep me"
    r = mnv2_inprocess("export", "--weights", str(weights), "--out", str(tmp_path / "missing" / "m.onnx"))
    assert_one_line_error(r, "does not exist")
