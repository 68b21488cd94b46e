"""Keras `MobileNetV2` weights -> ours (the Keras ImageNet weights are the paper authors' TF-Slim release).

Two file layouts are read with h5py (no Keras or TensorFlow needed):
  - Keras 2 era `.h5` (the published weight files): root attribute `layer_names`; each layer group has attribute
    `weight_names` (`"Conv1/kernel:0"`, ...) and the arrays at `group[weight_name]`. A whole-model `.h5` keeps the
    same under `model_weights`.
  - Keras 3 `.weights.h5` (`model.save_weights`): `layers/<class name>[_k]/vars/0..n`, the layer's name in the `vars`
    group's `name` attribute (older Keras 3 files lack it: their k-th group of a class is the k-th such layer). A
    `.keras` archive holds such a file as `model.weights.h5`.
TensorFlow conventions carried over: 'SAME' padding (extra pixel bottom/right on strided convs), BN epsilon 1e-3,
kernels stored (kh, kw, in, out) and depthwise kernels (kh, kw, channels, 1), inputs scaled to [-1, 1].
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models import TABLE_2, MobileNetV2
from .common import Imported, infer_width, load_renamed, preprocess_record

NUM_BLOCKS = sum(n for _, _, n, _ in TABLE_2)

# Keras `preprocess_input` for MobileNetV2 is x / 127.5 - 1: mean 0.5, std 0.5 in [0, 1] units. TF-Slim evaluates with
# a central crop of 87.5% and a bilinear resize.
PREPROCESS = preprocess_record([0.5] * 3, [0.5] * 3, resolution=224, crop_fraction=0.875, interpolation="bilinear")

# Positional variable names of a Keras 3 layer, by the class name its group carries.
_VARS = {"conv2d": ("kernel", "bias"), "depthwise_conv2d": ("kernel", "bias"), "dense": ("kernel", "bias"),
         "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance")}
_PARAMS = {"weight": "kernel", "bias": "bias"}
_BN_PARAMS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance",
              "num_batches_tracked": None}


def keras_layers(num_blocks: int = NUM_BLOCKS) -> list[tuple[str, str, str]]:
    """(our module path, Keras layer name, Keras class) in the order Keras builds the layers."""
    conv, dw, bn = "conv2d", "depthwise_conv2d", "batch_normalization"
    rows = [("stem.conv", "Conv1", conv), ("stem.bn", "bn_Conv1", bn)]
    for b in range(num_blocks):
        prefix = "expanded_conv_" if b == 0 else f"block_{b}_"
        if b > 0:  # the t=1 block has no expansion layer
            rows += [(f"blocks.{b}.expand.conv", prefix + "expand", conv),
                     (f"blocks.{b}.expand.bn", prefix + "expand_BN", bn)]
        rows += [(f"blocks.{b}.dw.conv", prefix + "depthwise", dw), (f"blocks.{b}.dw.bn", prefix + "depthwise_BN", bn),
                 (f"blocks.{b}.project.conv", prefix + "project", conv),
                 (f"blocks.{b}.project.bn", prefix + "project_BN", bn)]
    return rows + [("head.conv", "Conv_1", conv), ("head.bn", "Conv_1_bn", bn), ("classifier", "predictions", "dense")]


def read_keras_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a Keras weights file keyed `"<layer name>/<weight>"` (weight: kernel, bias, gamma, beta,
    moving_mean, moving_variance), from either layout."""
    try:
        import h5py
    except ImportError:
        raise UserError("reading Keras weights needs h5py: pip install 'mnv2[keras]'") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such Keras weights file")
    try:
        if zipfile.is_zipfile(path):  # a `.keras` archive
            with zipfile.ZipFile(path) as archive:
                source = io.BytesIO(archive.read("model.weights.h5"))
        else:
            source = path
        with h5py.File(source, "r") as f:
            root = f.get("model_weights", f)  # a whole-model .h5 keeps the weights one level down
            if "layer_names" in root.attrs:
                return _read_legacy(root)
            if "layers" in root:
                return _read_keras3(root)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable Keras weights file ({e})") from None
    raise UserError(f"{path}: HDF5 file has neither Keras 2 'layer_names' nor Keras 3 'layers': not Keras weights")


def _read_legacy(root) -> dict[str, np.ndarray]:
    out = {}
    for layer in map(_text, root.attrs["layer_names"]):
        for weight in map(_text, root[layer].attrs.get("weight_names", [])):
            out[f"{layer}/{_short(weight)}"] = np.asarray(root[layer][weight])
    return out


def _read_keras3(root) -> dict[str, np.ndarray]:
    groups = {key: group["vars"] for key, group in root["layers"].items() if "vars" in group and len(group["vars"])}
    by_order = {cls: [name for _, name, c in keras_layers() if c == cls] for cls in _VARS}
    out = {}
    for key, vars_ in groups.items():
        cls, index = re.fullmatch(r"(.*?)(?:_(\d+))?", key).groups()
        name = _text(vars_.attrs["name"]) if "name" in vars_.attrs else None
        if name is None:  # Keras 3 before layer names were stored: the k-th group of a class is the k-th such layer
            order = by_order.get(cls, [])
            k = int(index or 0)
            name = order[k] if k < len(order) else key
        var_names = _VARS.get(cls, ())
        for i in sorted(vars_, key=int):
            weight = var_names[int(i)] if int(i) < len(var_names) else f"var{i}"
            out[f"{name}/{weight}"] = np.asarray(vars_[i])
    return out


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _short(weight_name: str) -> str:
    """"block_1_depthwise/depthwise_kernel:0" -> "kernel" (Keras 2 names depthwise kernels apart; Keras 3 does not)."""
    short = weight_name.split("/")[-1].split(":")[0]
    return "kernel" if short == "depthwise_kernel" else short


def from_keras(path: str | Path, preprocess: dict | None = None) -> Imported:
    """Our MobileNetV2 (TF padding, BN epsilon 1e-3) with Keras `MobileNetV2` weights from `path`.

    Width and classes are read from the shapes (`include_top=False` files give `num_classes=0`); the resolution of
    the preprocessing record is read from a published file's name (`..._0.35_96.h5` -> 96), else 224.
    """
    weights = read_keras_weights(path)
    origin = str(path)
    shapes = []
    for layer in ("Conv1", "expanded_conv_project", f"block_{NUM_BLOCKS - 1}_project"):
        if f"{layer}/kernel" not in weights:
            raise UserError(f"{origin}: not Keras MobileNetV2 weights (no layer {layer!r} with a kernel)")
        shapes.append(weights[f"{layer}/kernel"].shape[-1])
    width = infer_width(*shapes, origin)
    classifier = weights.get("predictions/kernel")
    kwargs = {"width_mult": width, "num_classes": 0 if classifier is None else int(classifier.shape[-1]),
              "padding": "tf", "bn_eps": 1e-3}
    model = MobileNetV2(**kwargs)
    layers = {ours: keras for ours, keras, _ in keras_layers(len(model.blocks))}

    def source_key(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        weight = (_BN_PARAMS if module.endswith(".bn") else _PARAMS)[param]
        return None if weight is None else f"{layers[module]}/{weight}"

    load_renamed(model, weights, source_key, origin, convert=_to_torch_layout)
    resolution = _resolution_from_name(Path(path).name)
    record = PREPROCESS | ({"resolution": resolution} if resolution else {}) | (preprocess or {})
    return Imported(model.eval(), kwargs, record, "keras")


def _to_torch_layout(key: str, value: torch.Tensor) -> torch.Tensor:
    if value.ndim == 4:  # conv (kh, kw, in, out) -> (out, in, kh, kw); depthwise (kh, kw, C, 1) -> (C, 1, kh, kw)
        depthwise = ".dw." in key
        return value.permute(2, 3, 0, 1) if depthwise else value.permute(3, 2, 0, 1)
    if value.ndim == 2:  # dense (in, out) -> (out, in)
        return value.t()
    return value


def _resolution_from_name(name: str) -> int | None:
    match = re.search(r"_(\d{2,3})(?:_no_top)?(?:\.weights)?\.h5$", name)
    return int(match.group(1)) if match else None
