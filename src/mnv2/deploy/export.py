"""ONNX export: BN folded, one self-contained file, checked against PyTorch with onnxruntime before it is written.

The graph comes from the dynamo exporter (`torch.onnx.export(..., dynamo=True)`): the TorchScript exporter is deprecated
in torch 2.14. The model's preprocessing, class names and build config go into the file's `metadata_props`, so
`Predictor.from_onnx` needs nothing but the .onnx file.

Detectors continue in export_detection.py, segmentation models in export_segmentation.py.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write_bytes
from ..choices import DEFAULT_OPSET, MIN_OPSET
from ..errors import UserError
from ..models import create_model
from ..weights import load_model
from .fold import fold_bn
from .preprocess import Preprocess, dumps, resolve_class_names

INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_MODEL, META_PREPROCESS, META_CLASSES, META_INT8 = ("mnv2.model", "mnv2.preprocess", "mnv2.class_names",
                                                       "mnv2.int8")
# META_TASK: "detection" (mnv2.deploy.export_detection) or "segmentation"; a file without it is a classifier.
META_TASK, META_POSTPROCESS, META_CATEGORY_IDS = "mnv2.task", "mnv2.postprocess", "mnv2.category_ids"
SEGMENTATION = "segmentation"
# A classifier's output activation (mnv2.deploy.runtime.OUTPUTS), when its weights record one; absent: softmax.
META_OUTPUT = "mnv2.output"


def optional_import(module: str, extra: str, purpose: str):
    """Import an optional runtime, or a UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the Python package {module!r}, which is not installed: "
                        f"pip install 'mnv2[{extra}]'") from None


def load_source(run: str | Path | None = None, weights: str | Path | None = None, model: str | None = None,
                width: float = 1.0, num_classes: int = 1000) -> tuple[nn.Module, dict]:
    """The model to deploy, in eval mode, and its config: a run's best weights, a weights file, or random weights."""
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise UserError(f"{run}: no such run directory")
        weights = run / "best.safetensors"
        if not weights.is_file():
            raise UserError(f"{run}: run directory has no best.safetensors (no epoch has finished yet?)")
    if weights is not None:
        return load_model(weights)
    if model is None:
        raise UserError("give a model: a run directory, a weights file, or a model name")
    kwargs = {"width_mult": width, "num_classes": num_classes}
    return create_model(model, **kwargs).eval(), {"model": model, "model_kwargs": kwargs}


def onnx_metadata(config: dict, preprocess: Preprocess, num_classes: int) -> dict[str, str]:
    """The metadata_props an exported classifier carries (all values JSON)."""
    names = resolve_class_names(config.get("class_names"), num_classes)
    output = {META_OUTPUT: dumps(config["output"])} if config.get("output") else {}
    return {META_MODEL: dumps({"model": config.get("model"), "model_kwargs": config.get("model_kwargs", {})}),
            META_PREPROCESS: dumps(preprocess.to_dict()), META_CLASSES: dumps(names), **output}


def to_onnx(model: nn.Module, resolution: int, dynamic_batch: bool = True, opset: int = DEFAULT_OPSET,
            metadata: dict[str, str] | None = None, output_names: tuple[str, ...] = (OUTPUT_NAME,),
            dynamic_size: bool = False):
    """The BN-folded `model` as an in-memory onnx.ModelProto with input [N, 3, R, R] named "input" and outputs named
    `output_names` (a classifier's "logits"; a detector's heads); `dynamic_size`: input [N, 3, H, W] with H and W
    free (a segmentation model)."""
    optional_import("onnxscript", "export", "ONNX export")
    onnx = optional_import("onnx", "export", "ONNX export")
    if opset < MIN_OPSET:
        raise UserError(f"--opset must be at least {MIN_OPSET}, got {opset}")
    folded = fold_bn(model)  # section 3: conv -> BN -> ReLU6 becomes one conv + Clip, which ORT fuses further
    # A non-square example for free H and W: the exporter must not take two dims with one example value for one.
    x = torch.randn(2 if dynamic_batch else 1, 3, resolution, resolution + (resolution // 2 if dynamic_size else 0))
    dims = {0: torch.export.Dim("batch", min=1)} if dynamic_batch else {}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height", min=16), 3: torch.export.Dim("width", min=16)})
    shapes = (dims,) if dims else None  # by position: forward's argument need not be named "x"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(folded, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=list(output_names), dynamic_shapes=shapes, verbose=False)
    proto = program.model_proto
    set_metadata(proto, metadata or {})
    onnx.checker.check_model(proto)
    return proto


def check_target(out: str | Path, opset: int) -> Path:
    """`out` as a Path, if its folder exists and `opset` is one we export; else the one-line error, before any work."""
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"{out}: output directory {out.parent} does not exist")
    if opset < MIN_OPSET:
        raise UserError(f"--opset must be at least {MIN_OPSET}, got {opset}")
    return out


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Add (or replace) metadata_props entries of an onnx.ModelProto."""
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        proto.metadata_props.add(key=key, value=value)


@torch.inference_mode()
def max_difference(model: nn.Module, onnx_model: bytes | str | Path, resolution: int, batches=(1,),
                   shapes: Sequence[tuple[int, int, int]] | None = None) -> tuple[float, float]:
    """(largest |PyTorch - onnxruntime| output, largest |PyTorch output|) over random inputs of the given batch sizes
    at resolution x resolution, or of the given (batch, height, width) `shapes`; every output of the model (a
    detector's two heads) is compared."""
    ort = optional_import("onnxruntime", "export", "checking the exported graph")
    source = str(onnx_model) if isinstance(onnx_model, (str, Path)) else onnx_model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    worst, scale = 0.0, 0.0
    for b, h, w in shapes or [(b, resolution, resolution) for b in batches]:
        x = torch.randn(b, 3, h, w, generator=g)
        outputs = model.eval()(x)
        for expected, got in zip(outputs if isinstance(outputs, tuple) else (outputs,),
                                 session.run(None, {INPUT_NAME: x.numpy()}), strict=True):
            expected = expected.numpy()
            if got.shape != expected.shape:
                raise UserError(f"exported graph gives shape {got.shape}, PyTorch {expected.shape}")
            worst = max(worst, float(np.abs(got - expected).max()))
            scale = max(scale, float(np.abs(expected).max()))
    return worst, scale


@dataclass
class ExportReport:
    path: Path
    resolution: int
    opset: int
    dynamic_batch: bool
    max_abs_diff: float
    max_abs_logit: float
    size_bytes: int


def export_onnx(model: nn.Module, config: dict, out: str | Path, resolution: int | None = None,
                dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, atol: float = 1e-4) -> ExportReport:
    """Write `model` to `out` as ONNX; success only if onnxruntime running the written bytes matches PyTorch to within
    `atol` (max absolute logit difference, 1e-4 by default; the logit scale is reported beside it).

    Atomic: the graph is checked before it is written, then written through `mnv2.atomic`; on any failure nothing
    appears at `out` (and an existing file there is left as it was).
    """
    out = check_target(out, opset)
    preprocess = Preprocess.from_dict(config.get("preprocess"), resolution)
    model = model.eval()
    num_classes = _num_outputs(model, preprocess.resolution)
    proto = to_onnx(model, preprocess.resolution, dynamic_batch, opset,
                    onnx_metadata(config, preprocess, num_classes))
    data = proto.SerializeToString()
    diff, scale = max_difference(model, data, preprocess.resolution, (1, 3) if dynamic_batch else (1,))
    # Absolute, as promised: an fp32 graph of a very confident model (|logits| ~ 20+) can come close to 1e-4;
    # the error then names the logit scale so the user can judge, and nothing is written.
    if not diff <= atol:
        raise UserError(f"{out}: exported graph differs from PyTorch by {diff:.3g} (> {atol:g}; largest |logit| "
                        f"{scale:.3g}); not written")
    atomic_write_bytes(out, data)
    return ExportReport(out, preprocess.resolution, opset, dynamic_batch, diff, scale, len(data))


@torch.inference_mode()
def _num_outputs(model: nn.Module, resolution: int) -> int:
    return int(model(torch.zeros(1, 3, resolution, resolution)).shape[1])


def read_metadata(proto) -> dict:
    """The mnv2 entries of an onnx.ModelProto's metadata_props, JSON-decoded (absent keys are absent)."""
    out = {}
    for entry in proto.metadata_props:
        if entry.key.startswith("mnv2."):
            try:
                out[entry.key] = json.loads(entry.value)
            except json.JSONDecodeError:
                raise UserError(f"ONNX metadata {entry.key!r} is not valid JSON") from None
    return out
