"""Shared by the segmentation deploy and predict tests: a small seeded DeepLabv3 whose masks mean something numerically,
images of several sizes, and its graph exported once per test process.

A fresh DeepLabv3 gives near-zero logits everywhere (BN's initial statistics shrink activations layer by layer and the
logits layer starts at std 0.01), so every pixel is a near-tie decided by rounding and parity of masks proves little.
`segmenter()` sets the BN statistics from the shapes images and scales the logits layer by 300: logits reach ~300 and
six to eight of the nine classes win somewhere in each image, with margins of all sizes. It is a numerical test
object, not a segmenter (its features are random).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from deploy_helpers import mnv2_inprocess
from PIL import Image

import mnv2
from mnv2.bench.latency import set_bn_statistics
from mnv2.data.synthetic import write_dataset
from mnv2.deploy.preprocess import Preprocess
from mnv2.weights import save_model

RES = 96  # the shapes images' size: the "training crop" recorded in the preprocessing
KWARGS = {"width_mult": 0.35, "num_classes": 9}
PREPROCESS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resolution": RES, "resize": "none",
              "interpolation": "bilinear"}
SIZES = ((64, 130), (97, 80), (96, 96))  # (height, width) of the test images: wide, tall, square


@functools.cache
def workdir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="mnv2-seg-test-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def shapes_segment() -> Path:
    """The shapes set in VOC's layout: 10 images of 96 px, 8 train and 2 val, labels.txt with 9 class names."""
    return write_dataset(workdir() / "shapes", "segment", images=10, size=RES)


def class_names() -> list[str]:
    return (shapes_segment() / "labels.txt").read_text().split()


def train_images() -> list[Path]:
    return sorted((shapes_segment() / "JPEGImages").glob("*.jpg"))


@functools.cache
def sized_images() -> tuple[Path, ...]:
    """Three PNGs of SIZES, cut and resized from the shapes images (lossless, so every reader sees equal pixels)."""
    out = workdir() / "sized"
    out.mkdir(exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        with Image.open(train_images()[i]) as im:
            path = out / f"img{i}_{h}x{w}.png"
            im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR).save(path)
            paths.append(path)
    return tuple(paths)


@functools.cache
def segmenter() -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, config as `SegmentationTask.save_weights` stores it)."""
    x = Preprocess.from_dict(PREPROCESS)(train_images())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mnv2.create_model("deeplabv3_mobilenet_v2", **KWARGS)
    set_bn_statistics(model, x)
    with torch.no_grad():
        model.logits.weight.mul_(300.0)
    config = {"model": "deeplabv3_mobilenet_v2", "model_kwargs": KWARGS, "task": "segmentation",
              "preprocess": PREPROCESS, "class_names": class_names()}
    return model.eval(), config


def save_weights(path: Path) -> Path:
    model, config = segmenter()
    return save_model(path, model, config["model"], config["model_kwargs"], task="segmentation",
                      preprocess=config["preprocess"], class_names=config["class_names"])


@functools.cache
def weights_file() -> Path:
    return save_weights(workdir() / "run" / "best.safetensors")


@functools.cache
def exported() -> tuple[Path, dict]:
    """The model exported once per process through `mnv2 export --weights ... --json`: (path, its JSON report)."""
    out = workdir() / "seg.onnx"
    r = mnv2_inprocess("export", "--weights", str(weights_file()), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


@torch.inference_mode()
def reference_logits(image: Path) -> np.ndarray:
    """PyTorch's logits [C, H, W] for one image at its own size, normalised as `mnv2 eval` does."""
    model, _ = segmenter()
    return model(Preprocess.from_dict(PREPROCESS)([image]))[0].numpy()


def assert_argmax_except_near_ties(mask: np.ndarray, logits: np.ndarray, tol: float, max_fraction: float = 1e-3):
    """`mask` is the argmax of `logits` [C, H, W] at every pixel but near-ties: where it differs, the top two logits
    are within `tol` (rounding of another runtime may pick either), and at most `max_fraction` of the pixels."""
    assert mask.shape == logits.shape[1:] and mask.dtype == np.uint8
    expected = logits.argmax(0)
    differ = mask != expected
    top2 = np.sort(logits, 0)[-2:]
    margin = top2[1] - top2[0]
    assert (margin[differ] <= tol).all(), f"differs at pixels with margin up to {margin[differ].max()}"
    assert differ.mean() <= max_fraction
