"""`mnv2 eval`: reproduces the trainer's validation numbers, and applies the preprocessing stored with the weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_engine_trainer import colour_folder, small_config
from torchvision.transforms import v2

from mnv2 import create_model
from mnv2.data import ImageFolderDataset
from mnv2.engine.trainer import Trainer
from mnv2.weights import save_model

ENV = {**os.environ, "MNV2_ALLOCATOR": "system"}


def mnv2_eval(*args):
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "eval", *args], capture_output=True, text=True,
                          env=ENV, timeout=300, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_eval_run_matches_training_metrics(tmp_path):
    data = colour_folder(tmp_path / "data")
    run = tmp_path / "run"
    result = Trainer(small_config("train.epochs=2", "train.ema_decay=0.5", f"data.root={data}"), run, data,
                     progress=False, log=lambda *a: None).fit()
    code, out, err = mnv2_eval("--run", str(run), "--json", "--workers", "0")
    assert code == 0, err
    got = json.loads(out)["results"]
    best = json.loads((run / "best.json").read_text())["metrics"]
    assert got["best"]["top1"] == best["top1"] and got["best"]["images"] == 12
    assert got["best"]["loss"] == pytest.approx(best["loss"], abs=1e-4)
    assert got["ema"]["top1"] == pytest.approx(result.metrics["ema"]["top1"])


def test_eval_weights_uses_their_preprocessing(tmp_path):
    """A weights file whose config asks for 40 px at crop fraction 0.8 with its own mean/std (as imported weights
    do) is evaluated exactly that way: compare with the same pipeline written out here with torchvision."""
    data = colour_folder(tmp_path / "data", n_val=5, size=30)
    torch.manual_seed(3)
    model = create_model("mobilenet_v2", width_mult=0.35, num_classes=3).eval()
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resolution": 40, "crop_fraction": 0.8,
           "interpolation": "bicubic"}
    path = save_model(tmp_path / "w.safetensors", model, "mobilenet_v2", {"width_mult": 0.35, "num_classes": 3},
                      preprocess=pre, class_names=["blue", "green", "red"])
    tf = v2.Compose([v2.Resize(50, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(40),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre["mean"], pre["std"])])
    ds = ImageFolderDataset(data, "val", transform=tf)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        logits = model(x)
    expected_loss = torch.nn.functional.cross_entropy(logits, y).item()
    expected_top1 = (logits.argmax(1) == y).float().mean().item()
    code, out, err = mnv2_eval("--weights", str(path), "--data", str(data), "--json", "--workers", "0")
    assert code == 0, err
    got = json.loads(out)["results"]["model"]
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert got["top1"] == pytest.approx(expected_top1)
    assert got["top5"] == 1.0  # 3 classes: the true class is always among the top 5


def test_eval_errors_are_one_line(tmp_path):
    code, _, err = mnv2_eval("--run", str(tmp_path / "nope"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no best.safetensors" in err
    data = colour_folder(tmp_path / "data")
    model = create_model("mobilenet_v2", width_mult=0.35, num_classes=5)
    path = save_model(tmp_path / "w.safetensors", model, "mobilenet_v2", {"width_mult": 0.35, "num_classes": 5},
                      preprocess={"mean": [0, 0, 0], "std": [1, 1, 1], "resolution": 32, "crop_fraction": 1.0})
    code, _, err = mnv2_eval("--weights", str(path), "--data", str(data))
    assert code == 2 and "Traceback" not in err and "5 outputs but the data has 3 class folders" in err


def test_eval_device_and_progress_in_a_log_file(tmp_path):
    """--device cpu evaluates; with stderr a file (a CI log), progress is one plain line per weights file, no '\\r'."""
    data = colour_folder(tmp_path / "data")
    model = create_model("mobilenet_v2", width_mult=0.35, num_classes=3)
    path = save_model(tmp_path / "w.safetensors", model, "mobilenet_v2", {"width_mult": 0.35, "num_classes": 3},
                      preprocess={"mean": [0, 0, 0], "std": [1, 1, 1], "resolution": 32, "crop_fraction": 1.0})
    log = tmp_path / "eval.log"
    with open(log, "w") as stderr:
        proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "eval", "--weights", str(path), "--data",
                               str(data), "--device", "cpu", "--workers", "0", "--batch-size", "2"],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV, timeout=300, check=False)
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "top-1" in proc.stdout and "(12 images of" in proc.stdout
    assert "\r" not in err
    lines = err.splitlines()  # 12 images in batches of 2: one line, when the loop ends
    assert len(lines) == 1 and lines[0].startswith("eval: 6/6 in "), err


def test_eval_bad_device_is_one_line(tmp_path):
    code, _, err = mnv2_eval("--weights", str(tmp_path / "w.safetensors"), "--data", str(tmp_path), "--device", "gpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--device" in err and "'gpu'" in err and "cpu" in err
    if not torch.cuda.is_available():
        data = colour_folder(tmp_path / "data")
        model = create_model("mobilenet_v2", width_mult=0.35, num_classes=3)
        path = save_model(tmp_path / "w.safetensors", model, "mobilenet_v2", {"width_mult": 0.35, "num_classes": 3},
                          preprocess={"mean": [0, 0, 0], "std": [1, 1, 1], "resolution": 32, "crop_fraction": 1.0})
        code, _, err = mnv2_eval("--weights", str(path), "--data", str(data), "--device", "cuda")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "no CUDA device" in err, err
