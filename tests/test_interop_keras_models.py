"""Keras models as people save them -> mnv2: transfer-learning models built on `keras.applications.MobileNetV2`
(nested as a sub-model of a Functional or a Sequential model, or its layers at the top level of the user's model)
saved whole, as a Keras 3 `.keras` archive and as `.h5`.

The `.h5` files are written by `model.save("x.h5")`, Keras 3's legacy writer, which keeps the Keras 2 layout
(`model_weights` group, `model_config` attribute). TensorFlow, and with it Keras 2, is not installed here, so these
files stand for the ones Keras 2 writes. Keras runs on its torch backend; models are built with random weights
(`weights=None`) and randomised BN statistics.

After import, the probabilities equal Keras's to 1e-4 on random tensors and on an image file run through
`mnv2 predict`'s own preprocessing (Keras side: `keras.utils.load_img` with the model's input size, / 127.5 - 1).
"""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from _interop_helpers import randomise_keras_bn  # sets KERAS_BACKEND before Keras is imported
from PIL import Image

from mnv2.cli.main import main
from mnv2.deploy.runtime import Predictor, class_probabilities
from mnv2.errors import UserError
from mnv2.interop import from_keras
from mnv2.weights import load_model

keras = pytest.importorskip("keras")

# Keras' torch backend converts tensors with np.array(x), which numpy 2 flags once per call; the legacy .h5 writer
# warns that the format is legacy.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


# --- Keras models ---------------------------------------------------------------------------------------------------

def _base(alpha: float, size: int, seed: int = 0, **kwargs):
    """A Keras MobileNetV2 (include_top=False unless `kwargs` say otherwise) with random weights and BN statistics."""
    keras.utils.set_random_seed(seed)
    kwargs = {"include_top": False, **kwargs}
    base = keras.applications.MobileNetV2(weights=None, alpha=alpha, input_shape=(size, size, 3), **kwargs)
    return randomise_keras_bn(base, np.random.default_rng(seed), size)


def _head(classes: int, activation: str | None, dropout: bool = True, pool: str = "avg") -> list:
    pooling = keras.layers.GlobalAveragePooling2D() if pool == "avg" else keras.layers.GlobalMaxPooling2D()
    return [pooling, *([keras.layers.Dropout(0.3)] if dropout else []), keras.layers.Dense(classes, activation)]


def _model(base, layers: list, nesting: str, before: tuple = ()):
    """`layers` on `base`: the base nested in a Functional or a Sequential model, or ("top") its layers and the head
    in one model, as `keras.Model(base.input, head(base.output))` builds it."""
    size = base.input_shape[1]
    if nesting == "sequential":
        return keras.Sequential([keras.Input((size, size, 3)), *before, base, *layers])
    if nesting == "functional":
        inputs = x = keras.Input((size, size, 3))
        for layer in before:
            x = layer(x)
        x = base(x, training=False)
    else:
        inputs, x = base.input, base.output
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def _keras_out(model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def _save(model, path):
    model.save(path)
    return path


def _ours(imported, x_nhwc: np.ndarray) -> np.ndarray:
    """The imported model's outputs as Keras gives them: logits through the recorded output activation."""
    with torch.no_grad():
        logits = imported.model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()
    return class_probabilities(logits, imported.output or "softmax")


def _random_input(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype("float32")


def _write_image(path, height: int = 131, width: int = 197):
    """A smooth RGB picture, not square (the resize squashes it) and not a multiple of the input size."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([np.sin(x / 7) * 120 + 128, np.cos(y / 5) * 120 + 128, (x + y) % 256], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _keras_image(path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The image as a Keras pipeline loads it: resized whole to size x size by PIL, float 0..255, NHWC."""
    image = keras.utils.load_img(path, target_size=(size, size), interpolation=interpolation)
    return keras.utils.img_to_array(image)[None]


def _run(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _predicted(out: str, classes: int) -> np.ndarray:
    """Per-class probabilities of the first image of `mnv2 predict --json --topk <classes>`."""
    probs = np.full(classes, np.nan)
    for p in json.loads(out)[0]["predictions"]:
        probs[p["label"]] = p["prob"]
    return probs


# --- parity ---------------------------------------------------------------------------------------------------------

# (alpha, input size, nesting, dropout, activation, file suffix)
_CASES = [
    (0.35, 96, "functional", True, "softmax", ".keras"),
    (0.35, 96, "sequential", False, "sigmoid", ".h5"),
    (1.0, 160, "functional", False, "sigmoid", ".h5"),
    (1.0, 160, "sequential", True, "softmax", ".keras"),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        (0.35, 96, "functional", False, "sigmoid", ".h5"),
        (0.35, 96, "sequential", True, "softmax", ".keras"),
        (1.0, 160, "functional", True, "softmax", ".keras"),
        (1.0, 160, "sequential", False, "sigmoid", ".h5"),
        (0.35, 160, "top", True, "softmax", ".h5"),
        (1.0, 96, "top", False, "sigmoid", ".keras"),
    ]),
]


@pytest.mark.parametrize("alpha, size, nesting, dropout, activation, suffix", _CASES)
def test_saved_model_gives_keras_probabilities(alpha, size, nesting, dropout, activation, suffix, tmp_path):
    model = _model(_base(alpha, size), _head(5, activation, dropout), nesting)
    imported = from_keras(_save(model, tmp_path / f"model{suffix}"))
    assert imported.model_kwargs == {"width_mult": alpha, "num_classes": 5, "padding": "tf", "bn_eps": 1e-3}
    assert imported.output == activation
    assert imported.preprocess == {"mean": [0.5] * 3, "std": [0.5] * 3, "resolution": size, "crop_fraction": 1.0,
                                   "interpolation": "bilinear", "resize": "squash"}
    x = _random_input(size)
    expected = _keras_out(model, x)
    assert expected.max() - expected.min() > 0.2  # the comparison is not between near-constant outputs
    assert np.abs(_ours(imported, x) - expected).max() <= 1e-4


def _as_keras2(path):
    """Rewrite a whole-model .h5 from Keras 3's legacy writer the way Keras 2 (TensorFlow 2.0-2.3) names things:
    weights "Conv1/kernel:0" (depthwise "depthwise_kernel:0", no outer model scope), a nested model's class "Model",
    the input's "batch_input_shape", the config stored as bytes."""
    import h5py

    def keras2(name: str) -> str:
        *_, layer, weight = name.split("/")
        if layer.endswith("depthwise") and weight == "kernel":
            weight = "depthwise_kernel"
        return f"{layer}/{weight}:0"

    with h5py.File(path, "r+") as f:
        config = f.attrs["model_config"]
        config = config.replace('"Functional"', '"Model"').replace('"batch_shape"', '"batch_input_shape"')
        f.attrs["model_config"] = config.encode()
        root = f["model_weights"]
        for layer in root.attrs["layer_names"]:
            group = root[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs.get("weight_names", [])]
            arrays = {n: np.asarray(group[n]) for n in names}
            for key in list(group):
                del group[key]
            for n, array in arrays.items():
                group.create_dataset(keras2(n), data=array)
            group.attrs["weight_names"] = np.array([keras2(n).encode() for n in names], dtype="S")
    return path


@pytest.mark.parametrize("nesting", ["functional", "sequential"])
def test_keras2_names_and_config(nesting, tmp_path):
    model = _model(_base(0.5, 96), _head(3, "sigmoid"), nesting)
    imported = from_keras(_as_keras2(_save(model, tmp_path / "keras2.h5")))
    x = _random_input(96)
    assert np.abs(_ours(imported, x) - _keras_out(model, x)).max() <= 1e-4


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_heads_in_other_forms(suffix, tmp_path):
    """Max pooling (a head layer, or the base's own `pooling="max"`), a linear Dense followed by an Activation layer,
    a Dense without bias, a Sequential head, augmentation before the base, the base's layers at the top level, a base
    renamed (width from the shapes alone) two models deep, and Keras' own include_top=True model saved whole."""
    size = 96
    augment = (keras.layers.RandomFlip(), keras.layers.RandomRotation(0.1))
    head = keras.Sequential([keras.layers.GlobalMaxPooling2D(), keras.layers.Dense(4, use_bias=False),
                             keras.layers.Activation("softmax")], name="my_head")
    cases = {"max_head": (_model(_base(0.5, size), [head], "functional", augment), "softmax", "max"),
             "base_pooling": (_model(_base(0.35, size, pooling="max"), [keras.layers.Dense(3)], "top"), "linear",
                              "max"),
             "nested_twice": (keras.Sequential([keras.Input((size, size, 3)),
                                                _model(_base(0.75, size, name="backbone"), [], "functional"),
                                                *_head(3, "softmax")]), "softmax", "avg"),
             "application": (_base(0.5, size, include_top=True, classes=4), "softmax", "avg")}
    for name, (model, output, pool) in cases.items():
        imported = from_keras(_save(model, tmp_path / f"{name}{suffix}"))
        assert imported.output == output and imported.model_kwargs.get("pool", "avg") == pool, name
        x = _random_input(size)
        expected = _keras_out(model, x)
        assert expected.std() > 0.1
        assert np.abs(_ours(imported, x) - expected).max() <= 1e-4, name


def test_widths_outside_the_published_set(tmp_path):
    """Any alpha Keras builds: 0.6 (no published weights), and 0.372, where Keras' int(c * alpha) rounding gives the
    96-channel stage 32 channels while ours at 0.372 would give 40: the importer takes 0.37, the alpha in the base's
    name, whose channels are Keras's."""
    for alpha in (0.6, 0.372):
        model = _model(_base(alpha, 96), _head(3, "softmax"), "functional")
        imported = from_keras(_save(model, tmp_path / f"alpha_{alpha}.keras"))
        x = _random_input(96)
        assert np.abs(_ours(imported, x) - _keras_out(model, x)).max() <= 1e-4, alpha
    assert imported.model_kwargs["width_mult"] == 0.37


def test_rescaling_in_the_model_is_the_recorded_normalisation(tmp_path):
    """A model that rescales its raw 0..255 input itself: the record is that rescaling, so `mnv2 predict` on the image
    gives Keras's probabilities for the raw image."""
    size = 96
    model = _model(_base(0.35, size), _head(3, "sigmoid"), "sequential",
                   before=(keras.layers.Rescaling(1 / 255),))
    src = _save(model, tmp_path / "rescaled.keras")
    imported = from_keras(src)
    assert imported.preprocess["mean"] == [0.0] * 3 and imported.preprocess["std"] == pytest.approx([1.0] * 3)
    dst, image = tmp_path / "rescaled.safetensors", _write_image(tmp_path / "picture.png")
    assert _run("convert", "--from", "keras", src, "--out", dst)[0] == 0
    code, out, _ = _run("predict", "--weights", dst, image, "--json", "--topk", 3, "--backend", "torch")
    assert code == 0
    expected = _keras_out(model, _keras_image(image, size))[0]
    assert np.abs(_predicted(out, 3) - expected).max() <= 1e-4


@pytest.mark.parametrize("alpha, size, nesting, activation, suffix, interpolation", [
    (0.35, 96, "functional", "softmax", ".keras", "bilinear"),
    (1.0, 160, "sequential", "sigmoid", ".h5", "bicubic"),
])
def test_predict_on_an_image_file_gives_keras_probabilities(alpha, size, nesting, activation, suffix,
                                                             interpolation, tmp_path):
    model = _model(_base(alpha, size), _head(4, activation), nesting)
    src, dst = _save(model, tmp_path / f"model{suffix}"), tmp_path / "model.safetensors"
    image = _write_image(tmp_path / "picture.png")
    code, out, _ = _run("convert", "--from", "keras", src, "--out", dst, "--interpolation", interpolation)
    assert code == 0 and f"4 classes, {activation} output" in out and "whole image" in out
    code, out, _ = _run("predict", "--weights", dst, image, "--json", "--topk", 4, "--backend", "torch")
    assert code == 0
    expected = _keras_out(model, _keras_image(image, size, interpolation) / 127.5 - 1)[0]
    assert np.abs(_predicted(out, 4) - expected).max() <= 1e-4


def test_max_pool_option_keeps_parameters_and_state_dict():
    """`MobileNetV2(pool="max")`, which Keras heads with GlobalMaxPooling2D need: the same parameters and state-dict
    keys as the paper's average pooling; the classifier sees the per-channel maximum of the feature map."""
    from mnv2.models import MobileNetV2
    avg, peak = MobileNetV2(num_classes=7, width_mult=0.5), MobileNetV2(num_classes=7, width_mult=0.5, pool="max")
    assert {k: v.shape for k, v in avg.state_dict().items()} == {k: v.shape for k, v in peak.state_dict().items()}
    peak.load_state_dict(avg.state_dict())
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        features = peak.eval().forward_features(x)
        assert torch.allclose(peak(x), peak.classifier(features.amax(dim=(2, 3))), atol=1e-6)
    with pytest.raises(ValueError, match="pool must be 'avg' or 'max'"):
        MobileNetV2(pool="sum")


# --- what cannot be imported ----------------------------------------------------------------------------------------

_UNSUPPORTED_HEADS = {
    "two_dense": (lambda: [keras.layers.GlobalAveragePooling2D(name="gap"),
                           keras.layers.Dense(16, activation="relu", name="hidden"),
                           keras.layers.Dense(3, activation="softmax", name="out")],
                  "hidden (Dense, activation relu), out (Dense, activation softmax)"),
    "flatten": (lambda: [keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="out")],
                "flat (Flatten), out (Dense"),
    "conv": (lambda: [keras.layers.Conv2D(8, 1, name="extra_conv"), keras.layers.GlobalAveragePooling2D(name="gap"),
                      keras.layers.Dense(3, name="out")],
             "extra_conv (Conv2D), gap (GlobalAveragePooling2D), out (Dense"),
}


@pytest.mark.parametrize("head", list(_UNSUPPORTED_HEADS))
def test_unsupported_head_names_its_layers_and_backbone_only_imports_the_base(head, tmp_path):
    layers, named = _UNSUPPORTED_HEADS[head]
    base = _base(0.35, 96)
    path = _save(_model(base, layers(), "functional"), tmp_path / f"{head}.keras")
    with pytest.raises(UserError) as error:
        from_keras(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: layers after the MobileNetV2 base")
    assert named in message and "--backbone-only" in message

    imported = from_keras(path, backbone_only=True)
    assert imported.model_kwargs["num_classes"] == 0 and imported.output is None
    x = _random_input(96)
    with torch.no_grad():
        features = imported.model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    expected = _keras_out(base, x).mean(axis=(1, 2))  # the base's map, average-pooled
    assert features.shape == expected.shape and expected.std() > 0.1
    assert np.abs(features - expected).max() <= 1e-4


def _no_mobilenet(tmp_path):
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, name="Conv1"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    return [_save(model, tmp_path / "small_cnn.keras"), _save(model, tmp_path / "small_cnn.h5")]


def _truncated(tmp_path):
    model = _model(_base(0.35, 96), _head(3, "softmax"), "functional")
    cut = []
    for suffix in (".keras", ".h5"):
        whole = _save(model, tmp_path / f"whole{suffix}").read_bytes()
        half = tmp_path / f"half{suffix}"
        half.write_bytes(whole[:len(whole) // 2])
        cut.append(half)
    return cut


def test_files_without_a_mobilenet_or_cut_short_give_one_line(tmp_path):
    for path in _no_mobilenet(tmp_path):
        with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: no Keras MobileNetV2 inside \(.*\)$"):
            from_keras(path)
    cut_keras, cut_h5 = _truncated(tmp_path)
    with pytest.raises(UserError, match=rf"^{re.escape(str(cut_keras))}: a truncated or damaged \.keras archive"):
        from_keras(cut_keras)
    with pytest.raises(UserError, match=rf"^{re.escape(str(cut_h5))}: not a readable Keras weights file \(.*trunc"):
        from_keras(cut_h5)


def test_cli_refuses_with_one_line_and_exit_2(tmp_path):
    unsupported = _save(_model(_base(0.35, 96), _UNSUPPORTED_HEADS["two_dense"][0](), "sequential"),
                        tmp_path / "two_dense.h5")
    cases = [(unsupported, "hidden (Dense, activation relu)"),
             *((path, "no Keras MobileNetV2 inside") for path in _no_mobilenet(tmp_path)),
             *((path, "truncated") for path in _truncated(tmp_path))]
    dst = tmp_path / "out.safetensors"
    for path, fragment in cases:
        code, out, err = _run("convert", "--from", "keras", path, "--out", dst)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, err
        assert lines[0].startswith(f"mnv2 convert: error: {path}: ") and fragment in lines[0], err
        assert not dst.exists()
    code, out, _ = _run("convert", "--from", "keras", unsupported, "--out", dst, "--backbone-only")
    assert code == 0 and "0 classes" in out
    config = load_model(dst)[1]
    assert config["model_kwargs"]["num_classes"] == 0 and "output" not in config


# --- downstream -----------------------------------------------------------------------------------------------------

def test_class_names_flag_reaches_predict(tmp_path):
    model = _model(_base(0.35, 96), _head(3, "softmax"), "functional")
    src, dst = _save(model, tmp_path / "pets.keras"), tmp_path / "pets.safetensors"
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nhamster\n")
    assert _run("convert", "--from", "keras", src, "--out", dst, "--class-names", names)[0] == 0
    assert load_model(dst)[1]["class_names"] == ["cat", "dog", "hamster"]
    image = _write_image(tmp_path / "picture.png")
    code, out, _ = _run("predict", "--weights", dst, image, "--json", "--topk", 3, "--backend", "torch")
    assert code == 0
    predictions = json.loads(out)[0]["predictions"]
    assert {(p["label"], p["name"]) for p in predictions} == {(0, "cat"), (1, "dog"), (2, "hamster")}
    expected = _keras_out(model, _keras_image(image, 96) / 127.5 - 1)[0]
    assert predictions[0]["name"] == ["cat", "dog", "hamster"][int(expected.argmax())]

    names.write_text("cat\ndog\n")
    code, _, err = _run("convert", "--from", "keras", src, "--out", tmp_path / "two.safetensors", "--class-names",
                        names)
    assert code == 2 and "2 names for a model with 3 classes" in err and len(err.strip().splitlines()) == 1


def test_export_and_eval_of_an_imported_model(tmp_path):
    """A max-pooling sigmoid model through `mnv2 export` (ONNX, the output activation and resize in its metadata),
    `mnv2 predict --onnx`, the torch-fast backend, and `mnv2 eval`, whose top-1 equals Keras's on the same images."""
    pytest.importorskip("onnxruntime")
    size = 96
    model = _model(_base(0.35, size), _head(3, "sigmoid", pool="max"), "functional")
    src, weights = _save(model, tmp_path / "m.keras"), tmp_path / "m.safetensors"
    assert _run("convert", "--from", "keras", src, "--out", weights)[0] == 0
    image = _write_image(tmp_path / "picture.png")
    expected = _keras_out(model, _keras_image(image, size) / 127.5 - 1)[0]

    onnx = tmp_path / "m.onnx"
    code, _, err = _run("export", "--weights", weights, "--out", onnx)
    assert code == 0, err
    code, out, _ = _run("predict", "--onnx", onnx, image, "--json", "--topk", 3)
    assert code == 0 and np.abs(_predicted(out, 3) - expected).max() <= 1e-4

    fast = Predictor.from_weights(weights, backend="torch-fast")  # the folded model: tsplit's head averages
    probs = {p.label: p.prob for p in fast.predict([image], topk=3)[0]}
    assert np.abs(np.array([probs[i] for i in range(3)]) - expected).max() <= 1e-4

    rng = np.random.default_rng(0)
    data, agree = tmp_path / "data", 0
    for i in range(6):
        label = i % 3
        folder = data / "val" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8)).save(path)
        agree += int(_keras_out(model, _keras_image(path, size) / 127.5 - 1)[0].argmax() == label)
    code, out, err = _run("eval", "--weights", weights, "--data", data, "--json", "--workers", 0)
    assert code == 0, err
    assert json.loads(out)["results"]["model"]["top1"] == pytest.approx(agree / 6)


@pytest.mark.slow
def test_int8_export_of_an_imported_model_keeps_its_output_and_resize(tmp_path):
    """int8 quantisation runs on an imported max-pooling model (global max pooling exports to MaxPool, whose shape
    the quantiser infers) and the .onnx keeps the output activation and the resize for `mnv2 predict`."""
    pytest.importorskip("onnxruntime")
    model = _model(_base(0.35, 96), _head(3, "sigmoid", pool="max"), "functional")
    weights, onnx = tmp_path / "m.safetensors", tmp_path / "m_int8.onnx"
    assert _run("convert", "--from", "keras", _save(model, tmp_path / "m.keras"), "--out", weights)[0] == 0
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(8):
        _write_image(calib / f"{i}.png", 100 + 9 * i, 150 - 7 * i)
    code, _, err = _run("export", "--weights", weights, "--out", onnx, "--int8", "--calib", calib,
                        "--calib-images", 8, "--agreement-images", 8)
    assert code == 0, err
    predictor = Predictor.from_onnx(onnx)
    assert predictor.output == "sigmoid" and predictor.preprocess.resize == "squash"
    probs = [p.prob for p in predictor.predict([calib / "0.png"], topk=3)[0]]
    assert all(0 < p < 1 for p in probs) and sum(probs) != pytest.approx(1.0)  # independent sigmoids
