"""Kill a training run with SIGKILL in the middle of an epoch, resume it, and get the same weights as a run that was
never interrupted (DESIGN.md: resume equal to an uninterrupted run)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_engine_trainer import colour_folder

from mnv2.engine.checkpoint import load_checkpoint

# Dropout, EMA, label smoothing and random crops all draw random numbers: the resumed run must restore them all.
# A recipe of its own, so the test does not depend on configs/demo.yaml.
RECIPE = """
model: {name: mobilenet_v2, width: 0.35, dropout: 0.2}
data: {resolution: 32, scale: [0.5, 1.0], num_workers: 0}
optim: {name: sgd, lr: 0.02, momentum: 0.9, weight_decay: 4.0e-5, grad_clip: 2.0}
schedule: {name: cosine, warmup_epochs: 0.5}
train: {epochs: 4, batch_size: 4, ema_decay: 0.9, label_smoothing: 0.1, checkpoint_every: 2, threads: 1, amp: fp32}
"""
ARGS = ["--no-progress"]
STEPS = 4 * (3 * 8 // 4)


def train(*args):
    cmd = [sys.executable, "-m", "mnv2.cli.main", "train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    data = colour_folder(tmp_path / "data")
    kill_resume_and_compare(tmp_path, RECIPE, data, STEPS)


def kill_resume_and_compare(tmp_path, recipe_text: str, data, steps: int) -> None:
    """Run the recipe twice; SIGKILL one run mid-epoch after its first checkpoint, resume it, and require the same
    weights, EMA and RNG state as the run that was never interrupted."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    common = ["--config", str(recipe), "--data", str(data), *ARGS]
    straight = train("--out", str(tmp_path / "a"), *common)
    killed = train("--out", str(tmp_path / "b"), *common)
    ckpt = tmp_path / "b" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    partial = load_checkpoint(ckpt)
    assert 0 < partial["step"] < steps and partial["batch_in_epoch"] > 0  # killed in the middle of an epoch

    resumed = train("--resume", str(tmp_path / "b"), "--no-progress")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed {ckpt}" in out
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(ckpt)
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["ema"].items():
        assert torch.equal(value, b["ema"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # metrics.jsonl: the records of the uninterrupted run, each once (the killed run's records after its checkpoint
    # are dropped on resume and written again)
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("a", "b")]
    keys = [[(r["kind"], r["step"]) for r in rs] for rs in records]
    assert keys[0] == keys[1] and len(set(keys[1])) == len(keys[1])
    for ra, rb in zip(*records):
        assert {k: v for k, v in ra.items() if "per_s" not in k} == {k: v for k, v in rb.items() if "per_s" not in k}


# The shipped training path: worker processes load the data (as every recipe does) and MixUp / CutMix mix each batch
# (the torchvision V2 recipe's 0.2 / 1.0), both restored exactly on resume.
MIX_RECIPE = RECIPE.replace("num_workers: 0", "num_workers: 2, mixup_alpha: 0.2, cutmix_alpha: 1.0")


def test_run_with_worker_processes_and_mixup_killed_and_resumed_equals_uninterrupted(tmp_path):
    assert "num_workers: 2" in MIX_RECIPE
    data = colour_folder(tmp_path / "data")
    kill_resume_and_compare(tmp_path, MIX_RECIPE, data, STEPS)


DETECTION_RECIPE = """
task: detection
model: {name: ssdlite_mobilenet_v2, width: 0.35}
data: {resolution: 64, num_workers: 0, zoom_out: 2.0, photometric: true}
optim: {name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 4.0e-5}
schedule: {name: cosine}
train: {epochs: 3, batch_size: 4, ema_decay: 0.9, checkpoint_every: 2, threads: 1, amp: fp32, eval_every: 3}
"""


def test_detection_run_killed_and_resumed_equals_uninterrupted(tmp_path):
    """The same for a detector: list-of-dict batches, SSD augmentation (IoU crop, zoom-out, photometric) drawn from
    per-sample seeds, hard negative mining."""
    from mnv2.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", "detect", images=15, size=64)  # 12 train images: 3 steps per epoch
    kill_resume_and_compare(tmp_path, DETECTION_RECIPE, data, 9)


class Crash(Exception):
    """The process dying at this point."""


@pytest.mark.parametrize("crashed", ["ema", "best"])
def test_crash_between_weights_and_their_json_never_leaves_a_disagreeing_pair(tmp_path, monkeypatch, crashed):
    """A kill after `<name>.safetensors` of epoch 2 is written and before its `<name>.json`: every reader sees epoch 2's
    weights with epoch 2's metadata; a `.json` is absent or says the same (never epoch 1's); the resumed run puts the
    copy back."""
    from deploy_helpers import mnv2_inprocess
    from test_engine_trainer import small_config

    import mnv2.weights
    from mnv2.deploy.export import load_source
    from mnv2.engine.trainer import Trainer
    from mnv2.weights import config_copy_path, read_config, read_weights

    data = colour_folder(tmp_path / "data")
    run = tmp_path / "run"
    cfg = small_config("train.epochs=3", "train.ema_decay=0.5", "train.checkpoint_every=2", f"data.root={data}")
    trainer = Trainer(cfg, run, data, progress=False, log=lambda *a: None)
    real_evaluate, real_copy = trainer.evaluate, mnv2.weights._write_config_copy

    def evaluate(model):  # best improves every epoch, so epoch 2 replaces epoch 1's best.safetensors
        return {**real_evaluate(model), "top1": float(trainer.epoch)}

    def write_copy(path, config):
        if trainer.epoch == 2 and path.name == f"{crashed}.safetensors":
            raise Crash
        real_copy(path, config)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    monkeypatch.setattr(mnv2.weights, "_write_config_copy", write_copy)
    with pytest.raises(Crash):
        trainer.fit()
    modules = {"model": trainer.model, "ema": trainer.ema.module}
    for name in ("best", "ema"):
        path = run / f"{name}.safetensors"
        state, header = read_weights(path)
        assert header["epoch"] == (2 if name == crashed or name == "ema" else 1), name
        if config_copy_path(path).exists():
            assert json.loads(config_copy_path(path).read_text()) == header, name
        else:
            assert name == crashed
    state, header = read_weights(run / f"{crashed}.safetensors")
    live = modules[header.get("weights", "ema")].state_dict()
    assert all(torch.equal(state[k], v) for k, v in live.items())  # epoch 2's weights, as the header says
    _model, config = load_source(run=run)  # what Predictor.from_run and `mnv2 export --run` load
    assert config == read_config(run / "best.safetensors")
    r = mnv2_inprocess("eval", "--run", str(run), "--json", "--workers", "0")
    assert r.returncode == 0, r.stderr
    for label, name in (("best", "best"), ("ema", "ema")):  # the evaluated weights are the ones the metadata scores
        got, meta = json.loads(r.stdout)["results"][label], read_config(run / f"{name}.safetensors")["metrics"]
        assert got["loss"] == pytest.approx(meta["loss"], abs=1e-4), label

    monkeypatch.setattr(mnv2.weights, "_write_config_copy", real_copy)
    logged = []
    Trainer(cfg, run, data, resume=True, progress=False, log=logged.append)
    assert f"wrote {crashed}.json from {crashed}.safetensors's header" in logged
    for name in ("best", "ema"):
        path = run / f"{name}.safetensors"
        assert json.loads(config_copy_path(path).read_text()) == read_config(path)
