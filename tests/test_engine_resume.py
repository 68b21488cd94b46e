"""Kill a training run with SIGKILL in the middle of an epoch, resume it, and get the same weights as a run that was
never interrupted (DESIGN.md: resume equal to an uninterrupted run)."""

import json
import os
import signal
import subprocess
import sys
import time

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
