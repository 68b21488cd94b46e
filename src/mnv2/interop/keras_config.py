"""Reading a saved Keras model's config: where the MobileNetV2 base sits, what comes before it, and its head.

A transfer-learning model people save is `keras.applications.MobileNetV2(include_top=False, ...)` inside a model of
their own: at the top level (the base's layers and theirs in one Functional), or nested as a sub-model (Functional or
Sequential, under any name, at any depth). Around it: input layers, augmentation and Rescaling before; global pooling
(the model's or the base's own `pooling=`), dropout and one Dense after. This module finds the base by its layer names
(`Conv1` ... `out_relu`, fixed by Keras' builder) and reads the rest layer by layer; every layer it cannot map is
named, so the error says exactly what is in the way.

The config is the JSON of `model.get_config()` wrapped as {"class_name", "config"}: a `.keras` archive's config.json,
a whole-model `.h5` file's `model_config` attribute (Keras 2 and Keras 3 write the same structure; Keras 2 says
"Model" where Keras 3 says "Functional", and "batch_input_shape" where Keras 3 says "batch_shape").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Layers that are the identity at inference (augmentation, dropout, noise). Keras' RandomCrop is not: at inference it
# centre-crops and resizes.
_INFERENCE_IDENTITY = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                       "GaussianNoise", "AlphaDropout", "ActivityRegularization")
_POOLING = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max", "GlobalAvgPool2D": "avg",
            "GlobalMaxPool2D": "max"}
_ACTIVATIONS = {"softmax": "softmax", "sigmoid": "sigmoid", "linear": "linear", None: "linear"}
# keras.applications.MobileNetV2 names its model f"mobilenetv2_{alpha:0.2f}_{rows}"
_BASE_NAME = re.compile(r"mobilenetv2_(\d+\.\d+)_(\d+|None)$")


@dataclass
class KerasModel:
    """What the import needs from a Keras model's config.

    base: layer names from the outermost model down to the model holding the MobileNetV2 layers (() when the saved
        model holds them itself); alpha: the width its name gives (None when renamed); input_size: (height, width) of
        the model's input (None: not fixed); mean / std: the normalisation the base sees, in [0, 1] pixel units;
        pool: "avg" or "max" (None: the base's map is not pooled); dense: layer-name path of the classifier (None:
        none); output: the classifier's activation; before / after: "name (Class)" of the layers that cannot be mapped
        before the base and after it.
    """

    base: tuple[str, ...]
    base_name: str
    alpha: float | None = None
    input_size: tuple[int | None, int | None] | None = None
    mean: list[float] = field(default_factory=lambda: [0.5] * 3)
    std: list[float] = field(default_factory=lambda: [0.5] * 3)
    pool: str | None = None
    dense: tuple[str, ...] | None = None
    output: str | None = None
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)


def class_name(layer: dict) -> str:
    return layer.get("class_name", "")


def layer_name(layer: dict) -> str:
    return layer.get("config", {}).get("name") or layer.get("name", "")


def sublayers(layer: dict) -> list[dict] | None:
    """The layers of a model (Functional, Sequential, Keras 2 "Model"), None for a plain layer."""
    layers = layer.get("config", {}).get("layers") if isinstance(layer.get("config"), dict) else None
    return layers if isinstance(layers, list) else None


def describe(config: dict) -> KerasModel | None:
    """The MobileNetV2 base and what surrounds it in a model config; None if there is no base inside. A ValueError
    if there are two."""
    found = _find_base(config, ())
    if found is None:
        return None
    path, name, before, after = found
    match = _BASE_NAME.search(name)
    spec = KerasModel(base=path, base_name=name, alpha=float(match.group(1)) if match else None)
    before, after = _flatten(before), _flatten(after)
    spec.input_size = _input_size([layer for _, layer in before], match)
    _read_before([layer for _, layer in before], spec)
    _read_head(after, spec)
    return spec


# Layers travel with the path of the model that holds them: (path, layer config).
def _find_base(model: dict, path: tuple[str, ...]):
    """(path to the model holding the base's layers, its name, layers before the base, layers after it) or None."""
    layers = sublayers(model) or []
    names = [layer_name(layer) for layer in layers]
    if "Conv1" in names and "out_relu" in names and names.index("Conv1") < names.index("out_relu"):
        first, last = names.index("Conv1"), names.index("out_relu")
        return path, layer_name(model), [(path, x) for x in layers[:first]], [(path, x) for x in layers[last + 1:]]
    hits = []
    for i, layer in enumerate(layers):
        if sublayers(layer) is not None:
            inner = _find_base(layer, (*path, layer_name(layer)))
            if inner is not None:
                hits.append((i, inner))
    if len(hits) > 1:
        raise ValueError(f"it holds {len(hits)} MobileNetV2 models ({', '.join(h[1][1] for h in hits)}); one is "
                         "imported at a time")
    if not hits:
        return None
    i, (inner_path, name, before, after) = hits[0]
    return (inner_path, name, [(path, x) for x in layers[:i]] + before,
            after + [(path, x) for x in layers[i + 1:]])


def _flatten(layers: list[tuple[tuple[str, ...], dict]]) -> list[tuple[tuple[str, ...], dict]]:
    """Nested models (an augmentation Sequential, a head Sequential) opened into their layers, in order."""
    out = []
    for path, layer in layers:
        inner = sublayers(layer)
        if inner is None:
            out.append((path, layer))
        else:
            out += _flatten([((*path, layer_name(layer)), x) for x in inner])
    return out


def _input_size(before: list[dict], name_match) -> tuple[int | None, int | None] | None:
    """(H, W) of the outermost declared input; else the size in the base's name; else None."""
    for layer in before:
        config = layer.get("config", {})
        shape = config.get("batch_shape") or config.get("batch_input_shape")
        if shape and len(shape) == 4 and (shape[1] is not None or shape[2] is not None):
            return shape[1], shape[2]
    if name_match and name_match.group(2) != "None":
        size = int(name_match.group(2))
        return size, size
    return None


def _describe_layer(layer: dict, detail: str = "") -> str:
    return f"{layer_name(layer)} ({class_name(layer)}{detail})"


def _is_identity(layer: dict) -> bool:
    cls = class_name(layer)
    return cls in _INFERENCE_IDENTITY or (cls.startswith("Random") and cls != "RandomCrop")


def _read_before(layers: list[dict], spec: KerasModel) -> None:
    """Rescaling layers before the base change what it sees: the image (0..255) the user feeds is rescaled in the
    model, so the record is that rescaling in [0, 1] units. Without one, the user applied Keras' `preprocess_input`
    (x / 127.5 - 1: mean 0.5, std 0.5), the `KerasModel` default."""
    scale, offset, rescaled = 1.0, 0.0, False
    for layer in layers:
        cls, config = class_name(layer), layer.get("config", {})
        if cls == "InputLayer" or _is_identity(layer):
            continue
        s, o = config.get("scale", 1.0), config.get("offset", 0.0)
        if cls == "Rescaling" and isinstance(s, (int, float)) and isinstance(o, (int, float)) and s > 0:
            scale, offset, rescaled = scale * s, offset * s + o, True
        else:
            spec.before.append(_describe_layer(layer))
    if rescaled:  # base input = 255 p * scale + offset = (p - mean) / std, p in [0, 1]
        std = 1 / (255 * scale)
        spec.mean, spec.std = [-offset * std] * 3, [std] * 3


def _read_head(layers: list[tuple[tuple[str, ...], dict]], spec: KerasModel) -> None:
    """[global pooling] [Flatten] [Dense: softmax, sigmoid or linear] [Activation / Softmax], dropout anywhere. From
    the first layer that does not fit, every layer that acts at inference is listed in `spec.after`."""
    for path, layer in layers:
        cls, config = class_name(layer), layer.get("config", {})
        if _is_identity(layer) or cls == "InputLayer":
            continue
        activation = "softmax" if cls == "Softmax" else config.get("activation")
        if not isinstance(activation, (str, type(None))):  # a custom activation, serialised as a dict
            activation = "custom"
        detail = f", activation {activation}" if cls in ("Dense", "Activation") and activation else ""
        if spec.after:
            spec.after.append(_describe_layer(layer, detail))
        elif cls in _POOLING and spec.pool is None and spec.dense is None and not config.get("keepdims"):
            spec.pool = _POOLING[cls]
        elif cls == "Flatten" and spec.pool is not None and spec.dense is None:
            continue  # a no-op on pooled features
        elif cls == "Dense" and spec.pool is not None and spec.dense is None and activation in _ACTIVATIONS:
            spec.dense, spec.output = (*path, layer_name(layer)), _ACTIVATIONS[activation]
        elif cls in ("Activation", "Softmax") and spec.output == "linear" and activation in _ACTIVATIONS:
            spec.output = _ACTIVATIONS[activation]
        else:
            spec.after.append(_describe_layer(layer, detail))
