"""`mnv2 train` from the command line: one-line errors (no traceback) for what a user gets wrong."""

import os
import subprocess
import sys

import pytest
from test_engine_trainer import colour_folder, small_config

from mnv2.engine.trainer import Trainer

ENV = {**os.environ, "MNV2_ALLOCATOR": "system"}  # skip the allocator re-exec: these runs stop before training


def mnv2_train(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "train", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnv2 train: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_data_folder(tmp_path):
    code, _, err = mnv2_train("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, str(tmp_path / "nope"), "no such data folder")
    assert not (tmp_path / "run").exists()


def test_empty_class_folder(tmp_path):
    data = colour_folder(tmp_path / "data")
    for f in (data / "train" / "blue").iterdir():
        f.unlink()
    code, _, err = mnv2_train("--data", str(data), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, str(data / "train" / "blue"), "empty class folder")


def test_unknown_config_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  name: sgd\n  momentun: 0.9\n")
    code, _, err = mnv2_train("--config", str(recipe), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, str(recipe), "unknown config key 'optim.momentun'")
    code, _, err = mnv2_train("--set", "train.epoch=3", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "--set", "unknown config key 'train.epoch'")


def test_incompatible_checkpoint(tmp_path):
    data = colour_folder(tmp_path / "data")
    run = tmp_path / "run"
    Trainer(small_config("train.max_steps=1", f"data.root={data}"), run, data, progress=False,
            log=lambda *a: None).fit()
    before = (run / "last.pt").read_bytes()
    code, _, err = mnv2_train("--resume", str(run), "--width", "1.0")
    assert_one_line_error(code, err, str(run / "last.pt"), "cannot resume", "width_mult=0.35 (config asks 1.0)")
    code, _, err = mnv2_train("--resume", str(run), "--model", "mobilenet_v1")
    assert_one_line_error(code, err, "cannot resume", "model 'mobilenet_v2', not 'mobilenet_v1'")
    assert (run / "last.pt").read_bytes() == before  # nothing already written is damaged
    (run / "last.pt").write_bytes(b"garbage")
    code, _, err = mnv2_train("--resume", str(run))
    assert_one_line_error(code, err, "not a readable mnv2 checkpoint")


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"precious")
    code, _, err = mnv2_train("--out", str(run), cwd=tmp_path)
    assert_one_line_error(code, err, "already holds a run")
    assert (run / "last.pt").read_bytes() == b"precious"
    assert not (tmp_path / "data").exists()  # refused before the embedded dataset is written


BAD_VALUES = [  # (arguments, what the one error line must name)
    (["--width", "0"], "'model.width' is 0.0"),
    (["--batch-size", "0"], "'train.batch_size' is 0"),
    (["--lr", "-0.1"], "'optim.lr' is -0.1"),
    (["--set", "train.eval_every=0"], "'train.eval_every' is 0"),
    (["--set", "train.device=gpu"], "'train.device' is 'gpu'; choose one of auto, cpu, cuda"),
    (["--set", "train.amp=fp23"], "'train.amp' is 'fp23'"),
    (["--set", "optim.name=adam"], "'optim.name' is 'adam'"),
    (["--set", "data.rescale=[2.0, 0.5]"], "'data.rescale'"),
    (["--set", "detection.nms_iou=1.5"], "'detection.nms_iou' is 1.5"),
    (["--task", "segmentation", "--set", "model.kwargs.output_stride=12"], "output_stride must be 8 or 16"),
    (["--set", "model.kwargs.no_such_argument=1"], "no_such_argument"),
]


@pytest.mark.parametrize("args,named", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_config_values_are_one_line_naming_the_key(tmp_path, monkeypatch, capsys, args, named):
    """Every value is checked where the config is merged (choices, ranges) or where the model is built: exit status
    2, one line naming the key and what is allowed, no traceback, nothing written into the existing run folder."""
    from mnv2.cli.main import main
    from mnv2.data.synthetic import write_dataset

    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path / "data", "segment" if "segmentation" in args else "classify", images=16, size=32)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code = main(["train", "--data", str(data), "--out", str(run), "--no-progress", "--workers", "0", "--batch-size",
                 "2", *args])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, named)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
