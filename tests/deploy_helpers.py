"""Shared by the deploy / export / predict / bench tests: small images and random models whose outputs mean something.

A MobileNetV2 with random weights and its initial BN statistics maps every image to almost the same (tiny) logits, so
parity and agreement measured on it prove little. `discriminative_model` instead (1) sets realistic BN statistics from
the images themselves and (2) replaces the classifier with class prototypes (normalised mean features per class, a
nearest-class-mean head): logits are O(10) and vary from image to image, so top-1 decisions have margins of all sizes,
as a trained model's do. Random features do not separate the shapes classes, so the model is not accurate; it is a
numerical test object, not a classifier.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import mnv2
from mnv2.bench.latency import set_bn_statistics
from mnv2.data.synthetic import write_dataset
from mnv2.data.transforms import eval_preset
from mnv2.deploy.preprocess import load_image

CLASS_NAMES = ["circle", "square", "triangle", "star", "hexagon", "cross", "ring", "crescent"]


@functools.cache
def shapes_dir() -> Path:
    """The embedded shapes ImageFolder, 64 images at 64 px, written once per test process."""
    root = Path(tempfile.mkdtemp(prefix="mnv2-deploy-test-"))
    atexit.register(shutil.rmtree, root, True)
    return write_dataset(root, "classify", images=64, size=64)


def shapes_images(split: str = "train") -> list[Path]:
    return sorted((shapes_dir() / split).rglob("*.jpg"))


def label_of(path: Path) -> int:
    return CLASS_NAMES.index(path.parent.name)


@functools.cache
def discriminative_model(width: float = 0.35, resolution: int = 64) -> torch.nn.Module:
    images = shapes_images("train")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mnv2.create_model("mobilenet_v2", width_mult=width, num_classes=len(CLASS_NAMES))
    x = torch.stack([eval_preset(resolution)(load_image(p)) for p in images])
    set_bn_statistics(model, x)
    with torch.no_grad():
        f = torch.flatten(model.pool(model.forward_features(x)), 1)
        mean, std = f.mean(0), f.std(0) + 1e-6
        z = (f - mean) / std
        labels = torch.tensor([label_of(p) for p in images])
        protos = torch.stack([z[labels == c].mean(0) for c in range(len(CLASS_NAMES))])
        protos = protos / protos.norm(dim=1, keepdim=True)
        # logits = 10 * protos . z / sqrt(D), folded into the linear layer: |z| ~ sqrt(D), so logits are O(10) like a
        # trained classifier's (about 10 x the cosine between an image's features and its class prototype)
        w = 10.0 * protos / (std * z.shape[1] ** 0.5)
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(-(w * mean).sum(1))
    return model.eval()


def mnv2_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnv2.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


PREPROCESS = {"resolution": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_fraction": 1.0,
              "interpolation": "bilinear"}
CONFIG = {"model": "mobilenet_v2", "model_kwargs": {"width_mult": 0.35, "num_classes": 8},
          "class_names": CLASS_NAMES, "preprocess": PREPROCESS}


def _workdir() -> Path:
    return shapes_dir().parent


@functools.cache
def exported_onnx() -> Path:
    """`discriminative_model()` exported once per test process (dynamic batch, 64 px, class names in metadata)."""
    from mnv2.deploy import export_onnx
    return export_onnx(discriminative_model(), CONFIG, _workdir() / "fp32.onnx", dynamic_batch=True).path


@functools.cache
def quantized_onnx() -> Path:
    """`exported_onnx()` quantised to int8, calibrated on the training images (never on the validation images)."""
    from mnv2.deploy.preprocess import Preprocess
    from mnv2.deploy.quantize import CalibrationReader, quantize_int8
    reader = CalibrationReader.from_images(shapes_images("train"), Preprocess.from_dict(PREPROCESS))
    return quantize_int8(exported_onnx(), _workdir() / "int8.onnx", reader)


def mnv2_inprocess(*args) -> subprocess.CompletedProcess:
    """The CLI's own entry point in this process (same error handling as the console script, no interpreter start)."""
    import contextlib
    import io

    from mnv2.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
