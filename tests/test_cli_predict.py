"""`mnv2 predict` end to end in a subprocess: a run directory, a weights file and an .onnx file give the same labels."""

import json

import torch
from deploy_helpers import (
    CLASS_NAMES,
    assert_one_line_error,
    discriminative_model,
    exported_onnx,
    mnv2_cli,
    mnv2_inprocess,
    shapes_images,
)

from mnv2.data.transforms import eval_preset
from mnv2.deploy.preprocess import load_image
from mnv2.weights import save_model


def _fake_run(tmp_path):
    run = tmp_path / "run"
    save_model(run / "best.safetensors", discriminative_model(), "mobilenet_v2",
               {"width_mult": 0.35, "num_classes": 8}, class_names=CLASS_NAMES,
               preprocess={"resolution": 64, "crop_fraction": 1.0})
    return run


def _expected_top1(images):
    x = torch.stack([eval_preset(64, crop_fraction=1.0)(load_image(p)) for p in images])
    with torch.inference_mode():
        return discriminative_model()(x).argmax(1).tolist()


def test_predict_run_and_onnx_give_the_models_labels(tmp_path):
    images = shapes_images("val")[:4]
    expected = [CLASS_NAMES[i] for i in _expected_top1(images)]
    run = _fake_run(tmp_path)
    for cli, source in ((mnv2_cli, ["--run", str(run), "--backend", "torch-fast"]),
                        (mnv2_inprocess, ["--weights", str(run / "best.safetensors"), "--backend", "onnxruntime"])):
        r = cli("predict", *source, *map(str, images), "--topk", "2", "--threads", "1", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert [o["image"] for o in out] == [str(p) for p in images]
        assert [o["predictions"][0]["name"] for o in out] == expected
        assert all(len(o["predictions"]) == 2 for o in out)
    r = mnv2_cli("predict", "--onnx", str(exported_onnx()), str(images[0]), "--topk", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{images[0]}: {expected[0]} (")


def test_bad_input_is_one_line(tmp_path):
    run = _fake_run(tmp_path)
    image = str(shapes_images("val")[0])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"garbage" * 100)
    mismatched = tmp_path / "mismatch"
    save_model(mismatched / "best.safetensors", torch.nn.Linear(3, 3), "mobilenet_v2",
               {"width_mult": 0.35, "num_classes": 8})
    cases = [
        (["--run", str(run), "--backend", "torch", str(broken)], str(broken)),
        (["--run", str(run), "--backend", "torch", str(tmp_path / "absent.png")], "absent.png"),
        (["--onnx", str(corrupt), image], str(corrupt)),
        (["--run", str(mismatched), image], "best.safetensors"),
        (["--run", str(run), image, "--topk", "0"], "--topk"),
        (["--onnx", str(exported_onnx()), "--backend", "torch", image], "runs on onnxruntime, openvino, "),
    ]
    for i, (args, fragment) in enumerate(cases):
        # two as the user runs them (fresh interpreter), the rest through the same entry point in-process
        assert_one_line_error((mnv2_cli if i < 2 else mnv2_inprocess)("predict", *args), fragment)
