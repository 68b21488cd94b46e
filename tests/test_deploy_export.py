"""ONNX export: parity with PyTorch across widths and resolutions, dynamic batch, BN folded, metadata, atomic writes."""

import json
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mnv2
from mnv2.bench.latency import random_model
from mnv2.deploy import export_onnx
from mnv2.deploy.export import META_CLASSES, META_PREPROCESS
from mnv2.errors import UserError


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_parity(tmp_path, width, resolution, dynamic, config=None):
    model = random_model(lambda: mnv2.create_model("mobilenet_v2", width_mult=width, num_classes=3), resolution)
    model.classifier.weight.data *= 10  # logits of order 1-5, as a trained model's
    out = tmp_path / "m.onnx"
    report = export_onnx(model, config or {"model": "mobilenet_v2"}, out, resolution=resolution,
                         dynamic_batch=dynamic)
    assert report.path == out and report.resolution == resolution
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one self-contained file, no .data, no temp left
    session = _session(out)
    for batch in (1, 3) if dynamic else (1,):  # one file serves batch 1 and batch 3
        x = torch.randn(batch, 3, resolution, resolution)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert expected.std() > 0.3  # logits that vary: parity on near-zero outputs would prove nothing
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
    if not dynamic:
        with pytest.raises(Exception, match="invalid dimensions"):  # a static graph rejects other batch sizes
            session.run(None, {"input": np.zeros((2, 3, resolution, resolution), np.float32)})
    graph = onnx.load(str(out))
    assert graph.opset_import[0].version >= 17
    ops = {n.op_type for n in graph.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops  # BN folded into the convolutions
    return {e.key: json.loads(e.value) for e in graph.metadata_props}


def test_onnx_parity_static_batch(tmp_path):
    _check_parity(tmp_path, 0.35, 96, dynamic=False)


def test_onnx_parity_dynamic_batch_and_metadata(tmp_path):
    preprocess = {"resolution": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "crop_fraction": 1.0,
                  "interpolation": "bicubic"}
    meta = _check_parity(tmp_path, 1.0, 64, dynamic=True,
                         config={"model": "mobilenet_v2", "class_names": ["cat", "dog", "eel"],
                                 "preprocess": preprocess})
    assert meta[META_CLASSES] == ["cat", "dog", "eel"]
    assert meta[META_PREPROCESS] == preprocess


@pytest.mark.slow
@pytest.mark.parametrize("width, resolution", [(1.4, 128), (0.75, 160), (0.5, 224)])
def test_onnx_parity_more_widths_and_resolutions(tmp_path, width, resolution):
    _check_parity(tmp_path, width, resolution, dynamic=True)


def test_failed_check_writes_nothing_and_keeps_existing_file(tmp_path):
    model = random_model(lambda: mnv2.create_model("mobilenet_v2", width_mult=0.35, num_classes=10), 32)
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"previous contents")
    with pytest.raises(UserError, match="differs from PyTorch"):  # a tolerance nothing can meet
        export_onnx(model, {"model": "mobilenet_v2"}, out, resolution=32, atol=-1.0)
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]


def test_exported_file_follows_the_umask_and_a_failed_write_keeps_the_old_one(tmp_path, umask_027, monkeypatch):
    """Readable by whoever the umask lets read it (not mkstemp's 0600); a write that fails on the way to the disk
    (here fsync, as on a full or failing disk) leaves the previous file and no temporary."""
    model = random_model(lambda: mnv2.create_model("mobilenet_v2", width_mult=0.35, num_classes=10), 32)
    out = tmp_path / "model.onnx"
    export_onnx(model, {"model": "mobilenet_v2"}, out, resolution=32)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    before = out.read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(model, {"model": "mobilenet_v2"}, out, resolution=32, dynamic_batch=True)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_arguments_are_user_errors(tmp_path):
    model = mnv2.create_model("mobilenet_v2", width_mult=0.35, num_classes=10).eval()
    with pytest.raises(UserError, match="opset must be at least 17"):
        export_onnx(model, {}, tmp_path / "a.onnx", resolution=64, opset=13)
    with pytest.raises(UserError, match="does not exist"):
        export_onnx(model, {}, tmp_path / "missing" / "a.onnx", resolution=64)
