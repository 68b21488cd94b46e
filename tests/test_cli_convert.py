"""`mnv2 convert`: the file it writes loads back with `mnv2.weights.load_model` and gives the original's outputs; bad
input gives one line and leaves DST alone."""

import json

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from _interop_helpers import keras_reference, randomise_bn, write_keras2_h5

from mnv2.cli.main import main
from mnv2.weights import load_model

# Keras' torch backend converts tensors with np.array(x), which numpy 2 flags once per call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def _convert(capsys, *argv):
    code = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnv2 convert: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_torchvision_pth_converts_and_loads_back(tmp_path, capsys):
    torch.manual_seed(0)
    ref = randomise_bn(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=37), seed=0)
    src, dst = tmp_path / "tv.pth", tmp_path / "out" / "mnv2.safetensors"
    torch.save(ref.state_dict(), src)
    code, out, _ = _convert(capsys, "--from", "torchvision", src, "--out", dst)
    assert code == 0
    params = sum(p.numel() for p in ref.parameters())
    assert f"width 0.5, 37 classes, {params:,} parameters" in out

    model, config = load_model(dst)
    assert config["source"] == "torchvision" and config["model_kwargs"] == {"width_mult": 0.5, "num_classes": 37}
    assert config["preprocess"]["interpolation"] == "bilinear" and config["preprocess"]["resolution"] == 224
    assert json.loads(dst.with_suffix(".json").read_text()) == config
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-4


def test_timm_safetensors_and_wrapped_checkpoint(tmp_path, capsys):
    ref = randomise_bn(timm.create_model("mobilenetv2_035", pretrained=False), seed=1)
    plain = tmp_path / "timm.safetensors"
    safetensors.torch.save_file(ref.state_dict(), plain)
    wrapped = tmp_path / "checkpoint.pth"  # a DistributedDataParallel training checkpoint
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, wrapped)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = ref(x)
    for src in (plain, wrapped):
        dst = tmp_path / f"{src.stem}-mnv2.safetensors"
        code, out, _ = _convert(capsys, src, "--from", "timm", "--out", dst, "--resolution", "192")
        assert code == 0 and "width 0.35, 1000 classes" in out
        model, config = load_model(dst)
        assert config["preprocess"]["interpolation"] == "bicubic" and config["preprocess"]["resolution"] == 192
        with torch.no_grad():
            assert (model(x) - expected).abs().max().item() <= 1e-4


def test_keras_h5_converts_with_tf_conventions(tmp_path, capsys):
    keras_model, x, expected = keras_reference(0.5)
    src = write_keras2_h5(keras_model, tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224.h5")
    dst = tmp_path / "keras.safetensors"
    code, out, _ = _convert(capsys, "--from", "keras", src, "--out", dst)
    assert code == 0 and "width 0.5, 1000 classes" in out
    model, config = load_model(dst)
    assert config["model_kwargs"]["padding"] == "tf" and config["model_kwargs"]["bn_eps"] == 1e-3
    assert config["preprocess"]["mean"] == [0.5] * 3 and config["preprocess"]["std"] == [0.5] * 3
    with torch.no_grad():
        got = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_bad_sources_give_one_line_and_leave_dst_alone(tmp_path, capsys):
    dst = tmp_path / "keep.safetensors"
    dst.write_bytes(b"precious")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 not a zip or pickle")
    timm_file = tmp_path / "timm.pth"
    torch.save(timm.create_model("mobilenetv2_050", pretrained=False).state_dict(), timm_file)
    not_h5 = tmp_path / "weights.h5"
    not_h5.write_text("hello")
    not_tensors = tmp_path / "numbers.pt"
    torch.save({"lr": 0.1, "epoch": 3}, not_tensors)
    bad_safetensors = tmp_path / "w.safetensors"
    bad_safetensors.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    cases = [
        (["--from", "torchvision", tmp_path / "missing.pth"], ["missing.pth", "no such state dict file"]),
        (["--from", "torchvision", corrupt], ["corrupt.pth", "not a readable PyTorch state dict file"]),
        (["--from", "torchvision", timm_file], ["timm.pth", "no key 'features.0.0.weight'", "use --from timm"]),
        (["--from", "keras", not_h5], ["weights.h5", "not a readable Keras weights file"]),
        (["--from", "timm", not_tensors], ["numbers.pt", "does not hold a state dict"]),
        (["--from", "timm", bad_safetensors], ["w.safetensors", "not a readable safetensors file"]),
    ]
    for argv, fragments in cases:
        code, out, err = _convert(capsys, *argv, "--out", dst)
        assert code == 2 and out == ""
        _one_line_error(err, *fragments)
        assert dst.read_bytes() == b"precious"
    written = {p.name for p in tmp_path.iterdir()} - {p.name for p in (corrupt, timm_file, not_h5, not_tensors,
                                                                         bad_safetensors)}
    assert written == {"keep.safetensors"}  # no .json beside it, no temporary file left


@pytest.mark.parametrize("argv, fragment", [
    (["--out", "x.pt"], "must be a .safetensors file"),
    (["--out", "x.safetensors", "--crop-fraction", "1.5"], "--crop-fraction must be in (0, 1]"),
])
def test_bad_options_give_one_line(tmp_path, capsys, argv, fragment):
    code, _, err = _convert(capsys, "--from", "timm", tmp_path / "w.pth", *argv)
    assert code == 2
    _one_line_error(err, fragment)
