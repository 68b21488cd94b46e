"""Keras `MobileNetV2` -> ours: the published weight files (the paper authors' TF-Slim release) and the
transfer-learning models people save, read with zipfile, json and h5py: nothing is unpickled, Keras is not needed.

File layouts:
  - Keras 2 era `.h5` (the published weight files, `save_weights`): root attribute `layer_names`; each layer group has
    attribute `weight_names` and the arrays at `group[weight_name]`. A whole-model `.h5` (`model.save("x.h5")`, Keras
    2, and Keras 3's legacy writer, which keeps that layout) holds the same under `model_weights`, and the model config
    as JSON in the root attribute `model_config`. A nested model is one group whose `weight_names` are its inner
    layers' ("Conv1/kernel:0" in Keras 2, "Conv1/kernel" in Keras 3), flattened over every level of nesting.
  - Keras 3 `.weights.h5` (`model.save_weights`): `layers/<class name>[_k]/vars/0..n`, the layer's name in the `vars`
    group's `name` attribute (older Keras 3 files lack it: their k-th group of a class is the k-th such layer); a
    nested model has its own `layers/...` under its group. A `.keras` archive (zip) holds such a file as
    `model.weights.h5` beside the model config, `config.json`.
Weights are keyed by the path of layer names from the outermost model: "Conv1/kernel" at the top level,
"mobilenetv2_1.00_224/Conv1/kernel" for a nested base. Where the base and the head are is read from the model config
(keras_config.py); a weights-only file has no config and holds the base alone (with its own `predictions`).

TensorFlow conventions carried over: 'SAME' padding (extra pixel bottom/right on strided convs), BN epsilon 1e-3,
kernels stored (kh, kw, in, out) and depthwise kernels (kh, kw, channels, 1), inputs scaled to [-1, 1].
"""

from __future__ import annotations

import io
import itertools
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models import TABLE_2, MobileNetV2
from .common import Imported, infer_width, load_renamed, preprocess_record
from .keras_config import KerasModel, class_name, describe, layer_name, sublayers

NUM_BLOCKS = sum(n for _, _, n, _ in TABLE_2)
# The last block of each Table 2 stage: its projection's output channels are the stage's width.
_STAGE_ENDS = tuple(end - 1 for end in itertools.accumulate(n for _, _, n, _ in TABLE_2))

# Keras `preprocess_input` for MobileNetV2 is x / 127.5 - 1: mean 0.5, std 0.5 in [0, 1] units. TF-Slim evaluates with
# a central crop of 87.5% and a bilinear resize: the record of the published weight files.
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


_BASE_LAYERS = frozenset(name for _, name, _ in keras_layers()) - {"predictions"}


def read_keras_file(path: str | Path) -> tuple[dict | None, dict[str, np.ndarray]]:
    """(the model config, None for a weights-only file; the arrays keyed "<layer path>/<weight>", weight: kernel,
    bias, gamma, beta, moving_mean, moving_variance) of a Keras `.h5`, `.weights.h5` or `.keras` file."""
    try:
        import h5py
    except ImportError:
        raise UserError("reading Keras weights needs h5py: pip install 'mnv2[keras]'") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such Keras weights file")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    config = None
    try:
        if is_zip:  # a `.keras` archive
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                if "model.weights.h5" not in names:
                    raise UserError(f"{path}: a zip file without model.weights.h5: not a .keras archive")
                if "config.json" in names:
                    config = json.loads(archive.read("config.json"))
                source = io.BytesIO(archive.read("model.weights.h5"))
        else:
            source = path
        with h5py.File(source, "r") as f:
            if config is None and "model_config" in f.attrs:
                config = json.loads(_text(f.attrs["model_config"]))
            if config is not None and not (isinstance(config, dict) and isinstance(config.get("config"), dict)):
                raise UserError(f"{path}: the model config is not one Keras writes (a class_name and its config)")
            root = f.get("model_weights", f)  # a whole-model .h5 keeps the weights one level down
            if "layer_names" in root.attrs:
                return config, _read_legacy(root, config)
            if "layers" in root:
                return config, _read_keras3(root, config)
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: a truncated or damaged .keras archive ({e})") from None
    except (OSError, KeyError, EOFError, ValueError) as e:  # h5py, zlib and json errors
        raise UserError(f"{path}: not a readable Keras weights file ({str(e).splitlines()[0]})") from None
    raise UserError(f"{path}: HDF5 file has neither Keras 2 'layer_names' nor Keras 3 'layers': not Keras weights")


def read_keras_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a Keras file keyed "<layer path>/<weight>" (see `read_keras_file`)."""
    return read_keras_file(path)[1]


def _read_legacy(root, config: dict | None) -> dict[str, np.ndarray]:
    models = {layer_name(x) for x in sublayers(config) or [] if sublayers(x) is not None} if config else None
    out = {}
    for layer in map(_text, root.attrs["layer_names"]):
        weights = [_text(w) for w in root[layer].attrs.get("weight_names", [])]
        owners = {_split(w)[0] for w in weights}
        nested = layer in models if models is not None else len(owners) > 1 and layer not in owners
        for w in weights:
            owner, weight = _split(w)
            out[f"{layer}/{owner}/{weight}" if nested else f"{layer}/{weight}"] = np.asarray(root[layer][w])
    return out


def _split(weight_name: str) -> tuple[str, str]:
    """"block_1_depthwise/depthwise_kernel:0" -> ("block_1_depthwise", "kernel"): the layer owning a weight and the
    weight's short name (Keras 2 names depthwise kernels apart; Keras 3 does not)."""
    *scope, short = weight_name.split(":")[0].split("/")
    return (scope[-1] if scope else ""), ("kernel" if short == "depthwise_kernel" else short)


def _read_keras3(group, model: dict | None, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, child in group["layers"].items():
        cls, index = re.fullmatch(r"(.*?)(?:_(\d+))?", key).groups()
        vars_ = child.get("vars")
        if vars_ is not None and "name" in vars_.attrs:
            name = _text(vars_.attrs["name"])
        else:  # Keras 3 before layer names were stored: the k-th group of a class is the k-th such layer
            name = _nth_layer(model, cls, int(index or 0)) or key
        if vars_ is not None:
            var_names = _VARS.get(cls, ())
            for i in sorted(vars_, key=int):
                weight = var_names[int(i)] if int(i) < len(var_names) else f"var{i}"
                out[f"{prefix}{name}/{weight}"] = np.asarray(vars_[i])
        if "layers" in child:
            inner = next((x for x in sublayers(model) or [] if layer_name(x) == name), None) if model else None
            out |= _read_keras3(child, inner, f"{prefix}{name}/")
    return out


def _nth_layer(model: dict | None, cls: str, k: int) -> str | None:
    """The name of the k-th layer of snake-case class `cls` in `model`'s config (without a config: in MobileNetV2's
    build order)."""
    if model is not None:
        order = [layer_name(x) for x in sublayers(model) or [] if _snake_case(class_name(x)) == cls]
    else:
        order = [name for _, name, c in keras_layers() if c == cls]
    return order[k] if k < len(order) else None


def _snake_case(name: str) -> str:
    """Keras' `to_snake_case`, which names the groups of a `.weights.h5` file after the layer classes."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", re.sub(r"\W+", "", name))
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def from_keras(path: str | Path, preprocess: dict | None = None, backbone_only: bool = False) -> Imported:
    """Our MobileNetV2 (TF padding, BN epsilon 1e-3) with the weights of the Keras `MobileNetV2` in `path`.

    A saved model (`.keras`, whole-model `.h5`): the base is found wherever it sits; its head (global pooling,
    dropout, one Dense) becomes our classifier, with the Dense's activation recorded as the output ("softmax",
    "sigmoid", "linear"), and the preprocessing is the model's: its input size, x / 127.5 - 1 (or its own Rescaling
    layers), the whole image resized to the input size ("squash"). Any other head is refused naming its layers;
    `backbone_only=True` imports the base alone (`num_classes=0`, pooled features out).

    A weights-only file (the published ones): width and classes are read from the shapes (`include_top=False`
    files give `num_classes=0`); the resolution of the TF-Slim record from the file's name (`..._0.35_96.h5` -> 96),
    else 224.

    `preprocess` overrides entries of the record (resolution, crop_fraction, interpolation).
    """
    origin = str(path)
    config, weights = read_keras_file(path)
    overrides = dict(preprocess or {})
    if config is None:
        prefix = _weights_only(weights, origin, backbone_only)
        has_top = not backbone_only and f"{prefix}predictions/kernel" in weights
        dense, output, pool = f"{prefix}predictions" if has_top else None, None, "avg"
        resolution = _resolution_from_name(Path(path).name)
        record = PREPROCESS | ({"resolution": resolution} if resolution else {})
    else:
        spec = _describe(config, origin, backbone_only)
        prefix = _base_prefix(spec, weights, origin)
        dense = None if backbone_only or spec.dense is None else _dense_key(spec, weights, origin)
        output = None if dense is None else spec.output
        pool = "max" if spec.pool == "max" and not backbone_only else "avg"
        record = preprocess_record(spec.mean, spec.std, _resolution(spec, origin, overrides), crop_fraction=1.0,
                                   interpolation="bilinear", resize="squash")

    base = {key[len(prefix):]: value for key, value in weights.items()
            if key.startswith(prefix) and key[len(prefix):].split("/")[0] in _BASE_LAYERS}
    classifier = {}
    if dense is not None:
        kernel = weights[f"{dense}/kernel"]
        bias = weights.get(f"{dense}/bias", np.zeros(kernel.shape[-1], kernel.dtype))  # Dense(use_bias=False)
        classifier = {"predictions/kernel": kernel, "predictions/bias": bias}
    counts = _channel_counts(base, origin)
    width = infer_width(counts[0], counts[1], counts[7], origin, counts=counts,
                        prefer=None if config is None else spec.alpha)
    kwargs = {"width_mult": width, "num_classes": int(classifier["predictions/kernel"].shape[-1]) if classifier else 0,
              "padding": "tf", "bn_eps": 1e-3} | ({"pool": "max"} if pool == "max" else {})
    model = MobileNetV2(**kwargs)
    layers = {ours: keras for ours, keras, _ in keras_layers(len(model.blocks))}

    def source_key(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        weight = (_BN_PARAMS if module.endswith(".bn") else _PARAMS)[param]
        return None if weight is None else f"{layers[module]}/{weight}"

    load_renamed(model, base | classifier, source_key, origin, convert=_to_torch_layout)
    return Imported(model.eval(), kwargs, record | overrides, "keras", output=output)


def _describe(config: dict, origin: str, backbone_only: bool) -> KerasModel:
    """The config's account of the model, or the one-line error saying what cannot be imported."""
    try:
        spec = describe(config)
    except ValueError as e:
        raise UserError(f"{origin}: {e}") from None
    except (AttributeError, TypeError, KeyError) as e:  # JSON of another shape than Keras writes
        raise UserError(f"{origin}: the model config is not one Keras writes ({type(e).__name__}: {e})") from None
    if spec is None:
        raise UserError(f"{origin}: no Keras MobileNetV2 inside (no model with layers 'Conv1' ... 'out_relu', as "
                        "keras.applications.MobileNetV2 builds them, at any level of the model config)")
    if spec.before:
        raise UserError(f"{origin}: layers before the MobileNetV2 base that cannot be mapped: "
                        f"{', '.join(spec.before)}; read there are inputs, augmentation, dropout and Rescaling")
    if spec.after and not backbone_only:
        raise UserError(f"{origin}: layers after the MobileNetV2 base that cannot be mapped: {', '.join(spec.after)}; "
                        "mnv2's classifier is global average or max pooling, dropout and one Dense with softmax, "
                        "sigmoid or no activation: --backbone-only imports the base alone, to fine-tune here")
    return spec


def _weights_key(path: tuple[str, ...], weights: dict) -> str:
    """The key prefix of the layer at config path `path`: the path itself (Keras 3 files), or the outermost model's
    name and the layer's (legacy .h5, which flattens nested models into their outermost group)."""
    full, flat = "/".join(path), "/".join((path[0], path[-1])) if len(path) > 2 else None
    return flat if flat is not None and f"{full}/kernel" not in weights and f"{flat}/kernel" in weights else full


def _base_prefix(spec: KerasModel, weights: dict, origin: str) -> str:
    prefix = _weights_key((*spec.base, "Conv1"), weights)[:-len("Conv1")]
    if f"{prefix}Conv1/kernel" not in weights:
        raise UserError(f"{origin}: the model config has a MobileNetV2 base {spec.base_name!r} but the file holds no "
                        "weights for it (layer 'Conv1')")
    return prefix


def _dense_key(spec: KerasModel, weights: dict, origin: str) -> str:
    key = _weights_key(spec.dense, weights)
    if f"{key}/kernel" not in weights:
        raise UserError(f"{origin}: the model config has a Dense layer {spec.dense[-1]!r} but the file holds no "
                        "weights for it")
    return key


def _weights_only(weights: dict, origin: str, backbone_only: bool) -> str:
    """The key prefix of the MobileNetV2 layers in a file without a model config; refuses layers besides them."""
    prefixes = sorted(key[:-len("Conv1/kernel")] for key in weights if re.search(r"(^|/)Conv1/kernel$", key))
    if not prefixes:
        raise UserError(f"{origin}: not Keras MobileNetV2 weights (no layer 'Conv1' with a kernel)")
    if len(prefixes) > 1:
        raise UserError(f"{origin}: holds {len(prefixes)} MobileNetV2 models ({', '.join(p or '/' for p in prefixes)})")
    prefix = prefixes[0]
    known = _BASE_LAYERS | {"predictions"}
    others = sorted({key.rsplit("/", 1)[0] for key in weights
                     if not (key.startswith(prefix) and key[len(prefix):].split("/")[0] in known)})
    if others and not backbone_only:
        raise UserError(f"{origin}: a weights-only file with layers besides MobileNetV2's ({', '.join(others)}), "
                        "which cannot be mapped without the model's config: save the whole model (model.save("
                        "'model.keras')), or import the base alone with --backbone-only")
    return prefix


def _resolution(spec: KerasModel, origin: str, overrides: dict) -> int:
    height, width = spec.input_size or (None, None)
    if height and width and height != width and "resolution" not in overrides:
        raise UserError(f"{origin}: the model's input is {height}x{width}, not square; mnv2 resizes images to a "
                        "square input: give the side to use with --resolution")
    return int(height or width or 224)


def _channel_counts(base: dict, origin: str) -> tuple[int, ...]:
    """Output channels of the stem, of each stage's last projection and of the last conv (`channel_counts`)."""
    layers = ["Conv1", *(_project(b) for b in _STAGE_ENDS), "Conv_1"]
    for layer in layers:
        if f"{layer}/kernel" not in base:
            raise UserError(f"{origin}: not Keras MobileNetV2 weights (no layer {layer!r} with a kernel)")
    return tuple(int(base[f"{layer}/kernel"].shape[-1]) for layer in layers)


def _project(block: int) -> str:
    return "expanded_conv_project" if block == 0 else f"block_{block}_project"


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
