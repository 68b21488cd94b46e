"""DDP: two CPU processes (torchrun, gloo) take the same steps as one process with the same global batch.

What is compared: model weights after K optimizer steps, within 1e-5, with BatchNorm frozen (`model.freeze_bn`, BN in
inference mode) and no dropout. With BN in training mode each rank normalises with its own half-batch statistics, which
is a different function from one process normalising the whole batch (SyncBatchNorm, the remedy, has no CPU kernel in
PyTorch); dropout draws per-rank random masks. Data order and augmentation are identical by construction (per-sample
seeds, engine/data_order.py), gradients are averaged by DDP, and the evaluation statistics are summed over ranks.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port
from test_engine_trainer import colour_folder

from mnv2.engine.checkpoint import load_checkpoint

K = 3


def run(tmp_path, data, name, nproc, batch):
    args = ["-m", "mnv2.cli.main", "train", "--data", str(data), "--out", str(tmp_path / name), "--width", "0.35",
            "--resolution", "32", "--epochs", "1", "--batch-size", str(batch), "--workers", "0", "--no-progress",
            "--set", f"train.max_steps={K}", "--set", "model.freeze_bn=true", "--set", "model.dropout=0.0",
            "--set", "optim.name=sgd", "--set", "optim.lr=0.1", "--set", "train.threads=1",
            "--set", "train.checkpoint_every=0", "--set", "train.amp=fp32", "--set", "data.scale=[0.5, 1.0]",
            "--set", "optim.weight_decay=4e-5", "--set", "schedule.name=constant", "--set", "train.label_smoothing=0.0"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "MNV2_ALLOCATOR": "system"}  # no allocator re-exec: fewer process start-ups
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-8000:]  # torchrun's summary alone is ~1,500
    return load_checkpoint(tmp_path / name / "last.pt")


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    data = colour_folder(tmp_path / "data", n_train=16, n_val=3)
    one = run(tmp_path, data, "one", 1, 8)
    two = run(tmp_path, data, "two", 2, 4)
    assert one["step"] == two["step"] == K and two["world_size"] == 2
    for key, value in one["model"].items():
        assert torch.allclose(value.float(), two["model"][key].float(), atol=1e-5, rtol=0), key
    # ...and training really moved the weights (the comparison is not between two initialisations).
    from mnv2 import create_model
    torch.manual_seed(0)
    init = create_model("mobilenet_v2", width_mult=0.35, num_classes=3, dropout=0.0).state_dict()
    moved = sum(not torch.allclose(init[k].float(), v.float()) for k, v in one["model"].items()
                if v.is_floating_point())
    assert moved > 10
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    evals_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line]
    assert evals[-1]["model/images"] == 9  # every val image once, split over the ranks
    assert abs(evals[-1]["model/loss"] - evals_one[-1]["model/loss"]) < 1e-4


def test_two_process_detection_gathers_every_rank_s_detections(tmp_path):
    """torchrun with a detector: each rank evaluates its share of the val images, rank 0 gathers the detections and
    scores them with COCOeval -- the same numbers one process computes on the saved weights."""
    from mnv2.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", "detect", images=15, size=64)  # 12 train / 3 val images
    args = ["-m", "mnv2.cli.main", "train", "--task", "detection", "--data", str(data), "--out", str(tmp_path / "run"),
            "--width", "0.35", "--resolution", "64", "--epochs", "2", "--batch-size", "3", "--workers", "0",
            "--no-progress", "--set", "train.threads=1", "--set", "train.amp=fp32", "--set", "data.photometric=false"]
    env = {**os.environ, "MNV2_ALLOCATOR": "system"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-8000:]  # torchrun's summary alone is ~1,500
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["world_size"] == 2 and state["step"] == 2 * (12 // (2 * 3))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[-1]["model/images"] == 3  # the ranks' shares (2 + 1 images) gathered, none twice
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "eval", "--run", str(tmp_path / "run"), "--json",
                           "--workers", "0"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-8000:]  # torchrun's summary alone is ~1,500
    single = json.loads(proc.stdout)["results"]["best"]
    # Not bit-equal: the ranks ran the convs on batches of 2 and 1 images, one process on a batch of 3, and the
    # near-tied scores of a barely trained detector can then swap places at the top-100 cut.
    assert single["images"] == 3 and single["AP"] == pytest.approx(best["metrics"]["AP"], abs=0.01)


def torchrun(tmp_path, *args, cwd=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mnv2.cli.main", "train", "--out", str(tmp_path / "run"), "--width", "0.35", "--resolution", "32",
           "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress", "--set", "train.threads=1",
           "--set", "train.amp=fp32", *args]
    env = {**os.environ, "MNV2_ALLOCATOR": "system", "MNV2_DIST_TIMEOUT": "120"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, check=False, cwd=cwd)


def corrupt(data, names):
    for name in names:
        (data / "train" / "red" / name).write_bytes(b"not an image at all")


def test_a_bad_image_on_one_rank_stops_both_with_its_error_once(tmp_path):
    """One rank meets an unreadable image. The two ranks are started by hand, as on two machines, where no torchrun
    agent kills the survivor: both must stop by themselves (agreeing on stopping, not waiting in an all-reduce until the
    120 s process-group timeout), and the error must be printed once."""
    data = colour_folder(tmp_path / "data", n_train=8, n_val=2)
    corrupt(data, ["3.png"])
    cmd = [sys.executable, "-m", "mnv2.cli.main", "train", "--data", str(data), "--out", str(tmp_path / "run"),
           "--width", "0.35", "--resolution", "32", "--epochs", "1", "--batch-size", "2", "--workers", "0",
           "--no-progress", "--set", "train.threads=1", "--set", "train.amp=fp32"]
    base = {**os.environ, "MNV2_ALLOCATOR": "system", "MNV2_DIST_TIMEOUT": "120", "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    start = time.monotonic()
    errs = [rank.communicate(timeout=200)[1] for rank in ranks]
    assert time.monotonic() - start < 100  # not the 120 s timeout
    assert [rank.returncode for rank in ranks] == [2, 2], errs
    lines = [line for err in errs for line in err.splitlines()]
    assert all("Traceback" not in line for line in lines), errs
    ours = [line for line in lines if line.startswith("mnv2 train: error:")]
    assert len(ours) == 1 and "3.png" in ours[0], errs
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_skipped_images_are_reported_from_every_rank(tmp_path):
    """`--on-bad-image skip` under torchrun: the report lists the unreadable images both ranks met."""
    data = colour_folder(tmp_path / "data", n_train=8, n_val=2)
    bad = ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png"]  # 6 of 24 training images: both ranks meet some
    corrupt(data, bad)
    proc = torchrun(tmp_path, "--data", str(data), "--on-bad-image", "skip")
    assert proc.returncode == 0, proc.stderr[-8000:]  # torchrun's summary alone is ~1,500
    assert "train: 6 unreadable images skipped" in proc.stdout, proc.stdout[-2000:]


def test_the_embedded_data_is_prepared_by_one_rank(tmp_path):
    """Without --data both ranks need ./data/shapes: local rank 0 writes it while the other waits, then both train."""
    proc = torchrun(tmp_path, "--set", "train.max_steps=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-8000:]  # torchrun's summary alone is ~1,500
    assert proc.stdout.count("data: the embedded shapes dataset") == 1
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "data" / "shapes" / "classify").is_dir()
