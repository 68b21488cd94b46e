"""Keras MobileNetV2 weights (Keras 3 `.weights.h5`, the Keras 2 era `.h5` of the published files, `.keras`) -> ours,
compared with Keras itself running on its torch backend."""

import os

import h5py
import numpy as np
import pytest
import torch
from _interop_helpers import keras_reference, write_keras2_h5  # sets KERAS_BACKEND before Keras is imported

from mnv2.errors import UserError
from mnv2.interop import from_keras
from mnv2.models import create_model

keras = pytest.importorskip("keras")

# Keras' torch backend converts tensors with np.array(x), which numpy 2 flags once per call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _save(model, path, layout):
    if layout == "keras2":
        return write_keras2_h5(model, path)
    if layout == "keras":
        model.save(path)
    else:
        model.save_weights(path)
    return path


_SUFFIX = {"keras3": ".weights.h5", "keras2": ".h5", "keras": ".keras"}


def _ours(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()


def _check_parity(alpha, layout, tmp_path, include_top=True, size=224):
    model, x, expected = keras_reference(alpha, include_top, size)
    imported = from_keras(_save(model, tmp_path / f"mnv2{_SUFFIX[layout]}", layout))
    classes = 1000 if include_top else 0
    assert imported.model_kwargs == {"width_mult": alpha, "num_classes": classes, "padding": "tf", "bn_eps": 1e-3}
    got = _ours(imported.model, x)
    assert got.shape == expected.shape
    assert expected.std() > 0.2  # the comparison below is not between two near-zero arrays
    assert np.abs(got - expected).max() <= 1e-4


_FEW = [0.5, 1.3]
_ALL = [0.35, 0.5, 0.75, 1.0, 1.3, 1.4]


@pytest.mark.parametrize("layout", ["keras3", "keras2"])
@pytest.mark.parametrize("alpha", [*_FEW, *(pytest.param(a, marks=pytest.mark.slow) for a in _ALL if a not in _FEW)])
def test_outputs_match_keras(alpha, layout, tmp_path):
    _check_parity(alpha, layout, tmp_path)


def test_tf_padding_and_epsilon_are_what_makes_the_outputs_agree(tmp_path):
    model, x, expected = keras_reference(0.5)
    imported = from_keras(_save(model, tmp_path / "w.weights.h5", "keras3"))
    for change in ({"padding": "torch"}, {"bn_eps": 1e-5}):
        other = create_model("mobilenet_v2", **(imported.model_kwargs | change)).eval()
        other.load_state_dict(imported.model.state_dict())
        assert np.abs(_ours(other, x) - expected).max() > 1e-2, change


def test_keras_archive_and_odd_input_size(tmp_path):
    # An odd size puts TF's 'SAME' padding on both sides of some strided convs, which Keras does as ZeroPadding2D.
    _check_parity(0.35, "keras", tmp_path, size=97)


def test_headless_file_gives_headless_model_and_resolution_from_name(tmp_path):
    model, x, expected = keras_reference(0.35, include_top=False, size=96)
    path = write_keras2_h5(model, tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5")
    imported = from_keras(path)
    assert imported.model_kwargs["num_classes"] == 0 and imported.preprocess["resolution"] == 96
    assert np.abs(_ours(imported.model, x) - expected).max() <= 1e-4


def test_keras3_file_without_layer_names_is_read_by_order(tmp_path):
    model, x, expected = keras_reference(0.5)
    path = _save(model, tmp_path / "old.weights.h5", "keras3")
    with h5py.File(path, "r+") as f:
        for group in f["layers"].values():
            group["vars"].attrs.pop("name", None)
        assert not any("name" in group["vars"].attrs for group in f["layers"].values())
    assert np.abs(_ours(from_keras(path).model, x) - expected).max() <= 1e-4


def test_preprocess_record_equals_keras_preprocess_input(tmp_path):
    model, _, _ = keras_reference(0.5)
    record = from_keras(_save(model, tmp_path / "w.weights.h5", "keras3")).preprocess
    pixels = np.random.default_rng(1).uniform(0, 255, size=(4, 8, 8, 3)).astype("float32")
    expected = keras.applications.mobilenet_v2.preprocess_input(pixels.copy())
    ours = (pixels / 255 - np.array(record["mean"])) / np.array(record["std"])
    assert np.abs(ours - expected).max() < 1e-5
    assert record["interpolation"] == "bilinear" and record["resolution"] == 224


def test_bad_files_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="missing.h5: no such Keras weights file"):
        from_keras(tmp_path / "missing.h5")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n" + os.urandom(200))
    with pytest.raises(UserError, match="corrupt.h5: not a readable Keras weights file"):
        from_keras(corrupt)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(UserError, match="empty.h5: HDF5 file has neither"):
        from_keras(empty)


def test_shape_mismatch_names_the_keras_weight(tmp_path):
    model, _, _ = keras_reference(0.5)
    path = write_keras2_h5(model, tmp_path / "w.h5")
    with h5py.File(path, "r+") as f:
        del f["block_3_expand_BN"]["block_3_expand_BN/gamma:0"]
        f["block_3_expand_BN"].create_dataset("block_3_expand_BN/gamma:0", data=np.ones(7, "float32"))
    with pytest.raises(UserError, match=r"w\.h5: key 'block_3_expand_BN/gamma' .* has shape \(7,\) but the model "
                                        r"expects \(96,\)"):
        from_keras(path)
