"""Detection on the one training loop: a tiny set overfits, the run directory serves eval and predict, and `mnv2 eval`
gives COCOeval's own numbers on the detections it saves."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mnv2.data.synthetic import write_dataset
from mnv2.engine.config import load_config
from mnv2.engine.trainer import Trainer
from mnv2.weights import load_model

ENV = {**os.environ, "MNV2_ALLOCATOR": "system"}
OVERFIT_AP50 = 0.9  # the bar this test sets; measured 1.000 from step 75 on (AP 0.96)


def tiny_detection_config(root, *extra):
    """8 training images of 64 px, evaluated on the same images (the val split points at the train files), no
    augmentation: what a detector must be able to memorise."""
    return load_config(None, [
        "task=detection", "model.name=ssdlite_mobilenet_v2", "model.width=0.35", "data.resolution=96",
        "data.num_workers=0", "data.iou_crop=false", "data.zoom_out=1.0", "data.photometric=false", "data.hflip=0.0",
        f"data.val_images={root}/images", f"data.val_annotations={root}/annotations/instances_train.json",
        "optim.name=adamw", "optim.lr=0.01", "optim.eps=1e-8", "optim.weight_decay=0.0", "schedule.name=cosine",
        "train.batch_size=8", "train.epochs=100", "train.eval_every=50", "train.threads=1", "train.amp=fp32",
        *extra])


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    root = write_dataset(tmp / "data", "detect", images=10, size=64)
    cfg = tiny_detection_config(root, f"data.root={root}")
    result = Trainer(cfg, tmp / "run", root, progress=False, log=lambda *a: None).fit()
    return root, tmp / "run", result


def test_tiny_set_overfits(overfit_run):
    _, run, result = overfit_run
    metrics = result.metrics["model"]
    assert metrics["AP50"] >= OVERFIT_AP50, metrics
    assert metrics["images"] == 8  # every image scored once
    _, meta = load_model(run / "best.safetensors")
    assert meta["task"] == "detection"
    assert meta["category_ids"] == [1, 2, 3, 5, 7, 8, 10, 13]  # the file's own ids, gaps kept
    assert meta["class_names"][:2] == ["circle", "square"] and meta["preprocess"]["resolution"] == 96
    assert meta["metrics"]["AP"] == pytest.approx(result.best["value"])


def test_eval_equals_cocoeval_on_saved_detections(overfit_run, tmp_path):
    root, run, result = overfit_run
    dets = tmp_path / "dets.json"
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "eval", "--run", str(run), "--json", "--workers",
                           "0", "--save-detections", str(dets)], capture_output=True, text=True, env=ENV,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)["results"]["best"]
    saved = json.loads(dets.read_text())
    assert saved and {d["category_id"] for d in saved} <= {1, 2, 3, 5, 7, 8, 10, 13}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_train.json"))
        ev = COCOeval(gt, gt.loadRes(str(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    assert [ours[n] for n in names] == pytest.approx(list(ev.stats), abs=1e-12)
    # ...and they are the numbers the trainer measured on the same weights (eval mode, same post-processing).
    assert ours["AP"] == pytest.approx(result.best["value"], abs=1e-6)


def test_predict_lists_and_draws_boxes(overfit_run, tmp_path):
    root, run, _ = overfit_run
    image = min((root / "images").glob("*.jpg"))
    out = tmp_path / "drawn"
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "predict", "--run", str(run), str(image),
                           "--json", "--out", str(out), "--score-threshold", "0.5"], capture_output=True, text=True,
                          env=ENV, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    (entry,) = json.loads(proc.stdout)
    gt = json.loads((root / "annotations" / "instances_train.json").read_text())
    image_id = next(i["id"] for i in gt["images"] if i["file_name"] == image.name)
    truth = [a for a in gt["annotations"] if a["image_id"] == image_id]
    assert len(entry["detections"]) == len(truth)  # memorised: one confident box per object
    for det in entry["detections"]:  # each box on an object of its class, in original-image pixels
        x0, y0, x1, y1 = det["box"]
        best = max(truth, key=lambda a: _iou((x0, y0, x1, y1), a["bbox"]))
        assert _iou((x0, y0, x1, y1), best["bbox"]) > 0.5 and det["category_id"] == best["category_id"]
    import numpy as np
    from PIL import Image
    drawn = np.asarray(Image.open(entry["drawn"]).convert("RGB"))
    original = np.asarray(Image.open(image).convert("RGB"))
    assert drawn.shape == original.shape == (64, 64, 3)
    assert (drawn != original).any(axis=-1).sum() >= 4 * 8  # at least the outline of a box


def _iou(box, xywh):
    x, y, w, h = xywh
    ix = max(0.0, min(box[2], x + w) - max(box[0], x))
    iy = max(0.0, min(box[3], y + h) - max(box[1], y))
    inter = ix * iy
    return inter / ((box[2] - box[0]) * (box[3] - box[1]) + w * h - inter)


@pytest.mark.parametrize("damage,named", [
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "annotation {id}"),
    (lambda d: d["annotations"][0].update(image_id=999999), "annotation {id}"),
    (lambda d: d["annotations"][0].update(category_id=4), "annotation {id}"),
    (lambda d: d.pop("categories"), "'categories'"),
], ids=["negative-box", "missing-image", "unknown-category", "no-categories"])
def test_bad_annotations_are_one_line_before_any_work(tmp_path, damage, named):
    root = write_dataset(tmp_path / "data", "detect", images=10, size=32)
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    ann_id = data["annotations"][0]["id"]
    damage(data)
    path.write_text(json.dumps(data))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "train", "--task", "detection", "--data", str(root),
                           "--out", str(run), "--no-progress"], capture_output=True, text=True, env=ENV, timeout=300,
                          check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and named.format(id=ann_id) in lines[0], proc.stderr
    assert not run.exists()  # nothing written


def test_malformed_json_is_one_line(tmp_path):
    root = write_dataset(tmp_path / "data", "detect", images=10, size=32)
    path = root / "annotations" / "instances_val.json"
    path.write_text(path.read_text()[:-20])
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "train", "--task", "detection", "--data", str(root),
                           "--out", str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, env=ENV,
                          timeout=300, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert str(path) in proc.stderr and "not a readable JSON file" in proc.stderr


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_unreadable_image_stops_the_run_or_is_skipped_and_reported(tmp_path, policy):
    root = write_dataset(tmp_path / "data", "detect", images=10, size=32)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    bad = root / "images" / data["images"][0]["file_name"]
    bad.write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "train", "--task", "detection", "--data", str(root),
                           "--out", str(run), "--no-progress", "--workers", "0", "--on-bad-image", policy,
                           "--set", "train.max_steps=1", "--set", "train.batch_size=8", "--resolution", "64"],
                          capture_output=True, text=True, env=ENV, timeout=300, check=False)
    if policy == "error":
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr, proc.stderr
        assert not (run / "best.safetensors").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "train: 1 unreadable image skipped" in proc.stdout and bad.name in proc.stdout, proc.stdout
        assert (run / "best.safetensors").is_file()


def test_demo_recipe_runs_as_shipped(tmp_path):
    """`mnv2 train --task detection` as a user types it (embedded data written on first use, the shipped demo recipe),
    cut to two steps: the recipe, the data it writes and the whole loop fit together."""
    proc = subprocess.run([sys.executable, "-m", "mnv2.cli.main", "train", "--task", "detection", "--out", "run",
                           "--no-progress", "--set", "train.max_steps=2"], capture_output=True, text=True, env=ENV,
                          timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ssdlite_mobilenet_v2 width 0.35 @ 160 on 320 images of 8 classes" in proc.stdout
    _, meta = load_model(tmp_path / "run" / "best.safetensors")
    assert meta["task"] == "detection" and meta["metrics"]["images"] == 80  # every val image scored
    assert (tmp_path / "data" / "shapes" / "detect" / "annotations" / "instances_val.json").is_file()


def test_a_classifier_is_not_silently_trained_as_a_detector(tmp_path):
    from mnv2.engine.tasks.detection import DetectionTask
    from mnv2.errors import UserError

    root = write_dataset(tmp_path / "data", "detect", images=10, size=32)
    task = DetectionTask(load_config(None, ["task=detection", "model.name=mobilenet_v2"]), root)
    task.datasets()
    with pytest.raises(UserError, match="'mobilenet_v2' is not a detector"):
        task.build_model()


def test_backbone_weights_from_a_classifier_file(tmp_path):
    """`--set model.backbone_weights=FILE`: the classifier's weights start the backbone (classifier layer dropped);
    a classifier of another width is one line naming the file."""
    from mnv2 import create_model
    from mnv2.engine.tasks.detection import DetectionTask
    from mnv2.errors import UserError
    from mnv2.weights import save_model

    classifier = create_model("mobilenet_v2", width_mult=0.35, num_classes=8)
    torch.nn.init.normal_(classifier.blocks[3].dw.conv.weight)  # not what a fresh backbone holds
    weights = save_model(tmp_path / "cls.safetensors", classifier, "mobilenet_v2",
                         {"width_mult": 0.35, "num_classes": 8})
    root = write_dataset(tmp_path / "data", "detect", images=10, size=32)
    task = DetectionTask(tiny_detection_config(root, f"model.backbone_weights={weights}"), root)
    task.datasets()
    detector = task.build_model()
    for key, value in classifier.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(detector.backbone.state_dict()[key], value), key
    wide = save_model(tmp_path / "wide.safetensors", create_model("mobilenet_v2", width_mult=0.5), "mobilenet_v2",
                      {"width_mult": 0.5, "num_classes": 1000})
    task = DetectionTask(tiny_detection_config(root, f"model.backbone_weights={wide}"), root)
    task.datasets()
    with pytest.raises(UserError, match="wide.safetensors.*width 0.5"):
        task.build_model()
