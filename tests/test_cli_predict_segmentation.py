"""`mnv2 predict` and `mnv2 export --int8` for segmentation models, through the CLI's own entry point: masks and
overlays written for every image, class fractions summing to one, nothing written when an input is unreadable, and
int8 mIoU measured as `mnv2 eval` measures it. The test model: segmentation_helpers."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from deploy_helpers import assert_one_line_error, mnv2_inprocess
from PIL import Image
from segmentation_helpers import (
    SIZES,
    assert_argmax_except_near_ties,
    class_names,
    exported,
    reference_logits,
    save_weights,
    segmenter,
    shapes_segment,
    sized_images,
    train_images,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("segrun") / "run"
    save_weights(run / "best.safetensors")
    return run


def _predict(*args):
    r = mnv2_inprocess("predict", *map(str, args))
    assert r.returncode == 0, r.stderr
    return r


def test_predict_writes_masks_and_overlays_and_lists_fractions(run_dir, tmp_path):
    images = list(sized_images())
    out = tmp_path / "out"
    report = json.loads(_predict("--run", run_dir, "--backend", "torch", *images, "--out", out, "--json").stdout)
    assert [e["image"] for e in report] == [str(p) for p in images]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        name for p in images for name in (f"{p.stem}.png", f"{p.stem}_overlay.jpg"))
    for entry, path, (h, w) in zip(report, images, SIZES):
        assert entry["backend"] == "torch" and entry["size"] == [h, w]
        with Image.open(entry["mask"]) as im:
            assert im.mode == "P" and im.size == (w, h)
            mask = np.asarray(im)
        logits = reference_logits(path)
        assert_argmax_except_near_ties(mask, logits, tol=1e-5 * np.abs(logits).max())
        with Image.open(entry["overlay"]) as im:
            assert im.format == "JPEG" and im.size == (w, h)
        fractions = {c["name"]: c["fraction"] for c in entry["classes"]}
        assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-9)
        assert len(fractions) >= 2 and set(fractions) <= set(class_names())
        for c in entry["classes"]:
            assert c["fraction"] == pytest.approx((mask == c["label"]).mean())


def test_text_output_and_the_onnx_file_agree_with_the_run(run_dir):
    """The plain listing: one line per image, its size, the classes with fractions (3 decimals) that sum to one;
    the exported graph (dispatched by its metadata) lists the same classes as the run."""
    images = list(sized_images())
    lines = {}
    for source in (("--run", run_dir, "--backend", "torch-fast"), ("--onnx", exported()[0])):
        text = _predict(*source, *images).stdout.strip().splitlines()
        assert len(text) == len(images)
        lines[source[0]] = text
        for line, path, (h, w) in zip(text, images, SIZES):
            assert line.startswith(f"{path}: {w}x{h}: ")
            shares = re.findall(r"(\w+) (\d\.\d{3})", line.split(": ", 2)[2])
            assert shares and {n for n, _ in shares} <= set(class_names())
            assert sum(float(f) for _, f in shares) == pytest.approx(1.0, abs=0.0005 * len(shares) + 1e-9)
    for a, b in zip(lines["--run"], lines["--onnx"]):
        assert re.findall(r"[a-z]+(?= \d)", a) == re.findall(r"[a-z]+(?= \d)", b)


def test_unreadable_image_is_one_line_and_writes_nothing(run_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    r = mnv2_inprocess("predict", "--run", str(run_dir), "--backend", "torch", str(sized_images()[0]), str(broken),
                       "--out", str(out))
    assert_one_line_error(r, str(broken))
    assert not out.exists()
    r = mnv2_inprocess("predict", "--run", str(run_dir), str(sized_images()[0]), "--out", str(broken))
    assert_one_line_error(r, "--out must be a folder")
    r = mnv2_inprocess("predict", "--run", str(run_dir), "--resolution", "8", str(sized_images()[0]))
    assert_one_line_error(r, "--resolution must be at least 16")


def test_fixed_resolution_from_the_command_line(run_dir):
    images = list(sized_images())
    report = json.loads(_predict("--run", run_dir, "--backend", "torch", "--resolution", "64", *images,
                                 "--json").stdout)
    assert [e["size"] for e in report] == [list(s) for s in SIZES]  # masks at the images' sizes


def test_export_arguments_for_segmentation_are_one_line(run_dir, tmp_path):
    r = mnv2_inprocess("export", "--run", str(run_dir), "--out", str(tmp_path / "a.onnx"), "--val-data",
                       str(shapes_segment()))
    assert_one_line_error(r, "--val-data", "--int8")
    r = mnv2_inprocess("export", "--run", str(run_dir), "--out", str(tmp_path / "a.onnx"), "--raw")
    assert_one_line_error(r, "--raw", "detectors")
    r = mnv2_inprocess("export", "--model", "deeplabv3_mobilenet_v2", "--out", str(tmp_path / "a.onnx"))
    assert_one_line_error(r, "--model deeplabv3_mobilenet_v2", "--run")
    r = mnv2_inprocess("export", "--run", str(run_dir), "--out", str(tmp_path / "a.onnx"), "--int8", "--calib",
                       str(shapes_segment() / "JPEGImages"), "--val-data", str(tmp_path / "nowhere"))
    assert_one_line_error(r, str(tmp_path / "nowhere"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_int8_export_reports_fp32_and_int8_miou_as_eval_measures_it(run_dir, tmp_path):
    """fp32's mIoU is `mnv2 eval`'s (SegmentationTask's evaluator on its val dataset, PyTorch); each int8 runtime's
    drop is reported beside it and stored in the file. Int8 agreement is not asserted: see the deploy test."""
    from torch.utils.data import DataLoader

    from mnv2.engine.config import Config
    from mnv2.engine.tasks import evaluate
    from mnv2.engine.tasks.segmentation import SegmentationTask

    calib = tmp_path / "calib"
    calib.mkdir()
    for p in [*train_images()[:4], *sized_images()]:  # three sizes
        shutil.copy(p, calib)
    out = tmp_path / "int8.onnx"
    r = mnv2_inprocess("export", "--run", str(run_dir), "--out", str(out), "--int8", "--calib", str(calib),
                       "--val-data", str(shapes_segment()), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    miou = report["miou"]
    assert report["val_images"] == 2 and report["calib_images"] == 7 and "onnxruntime-int8" in miou
    for name, m in miou.items():
        assert 0 <= m["mIoU"] <= 1 and 0 <= m["pixel_acc"] <= 1
        if name != "fp32":
            assert report["miou_drop"][name] == pytest.approx(miou["fp32"]["mIoU"] - m["mIoU"])
    model, _ = segmenter()
    task = SegmentationTask(Config(task="segmentation"), shapes_segment())
    task.class_names = class_names()
    loader = DataLoader(task.val_dataset(), batch_size=2, collate_fn=task.collate)
    _, evaluator = evaluate(task, model, loader, torch.device("cpu"), progress=False)
    assert miou["fp32"]["mIoU"] == pytest.approx(evaluator.summary["mIoU"], abs=1e-3)
    assert miou["fp32"]["pixel_acc"] == pytest.approx(evaluator.summary["pixel_acc"], abs=1e-3)
    import onnx
    graph = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    meta = {e.key: json.loads(e.value) for e in graph.metadata_props}
    assert meta["mnv2.int8"]["miou"]["fp32"]["mIoU"] == miou["fp32"]["mIoU"]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"] == ["int8.onnx"]
