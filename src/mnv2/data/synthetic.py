"""The embedded "shapes" dataset, written to disk in the three real layouts so the demo uses the real loaders.

- classify: ImageFolder, `classify/{train,val}/<class>/<nnnnnn>.jpg`, one dominant shape per image (its label) and
  smaller distractors of other classes.
- detect: COCO, `detect/images/<nnnnnn>.jpg` + `detect/annotations/instances_{train,val}.json`; several objects per
  image; category ids have gaps like COCO's (1..90 for 80 classes), so code that assumes contiguous ids fails here.
- segment: PASCAL VOC, `segment/JPEGImages/*.jpg`, `segment/SegmentationClass/*.png` (palette PNGs with the VOC colour
  map: 0 background, 1..K classes, 255 "void" on object boundaries as VOC marks them),
  `segment/ImageSets/Segmentation/{train,val}.txt`, and `segment/labels.txt` (the class names, background first, one
  per line), which `voc.find_voc` reads in place of VOC's 21 names.

Image i of a task is drawn from `numpy.random.default_rng((seed, task, i))`, so the files are a pure function of
(task, images, size, seed): the same arguments give byte-identical files (with the same NumPy, Pillow and libjpeg
builds). Each task folder is written into a temporary sibling and renamed into place, with a marker file written last,
so an interrupted write never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import plain_mode
from ..errors import UserError
from .shapes import CLASSES, Scene, classification_scene, multi_object_scene

TASKS = ("classify", "detect", "segment")
CATEGORY_IDS = (1, 2, 3, 5, 7, 8, 10, 13)  # one per class in CLASSES; gaps on purpose, as in COCO
MARKER = ".mnv2-complete.json"
_FORMAT_VERSION = 3  # bump when the files change: demo folders written by older code are redone (3: labels.txt)
_JPEG_QUALITY = 90
_VAL_EVERY = 5  # every 5th image goes to val: an 80/20 split

# Demo defaults. classify: 8 classes x 300 images (240 train / 60 val) at 64 px, ~4 s of CPU to write. A small
# network from scratch overfits a few hundred images per class long before it learns shapes under rotation: at equal
# steps (~230 of batch 64) a 4-layer CNN reached 0.38 val accuracy on this set, 0.25 on the earlier 1,200-image draw
# with busier backgrounds and smaller shapes (chance 0.125). Measured on a loaded machine; re-measure when quiet.
DEMO = {
    "classify": {"images": 2400, "size": 64, "seed": 0},
    "detect": {"images": 400, "size": 128, "seed": 0},
    "segment": {"images": 300, "size": 128, "seed": 0},
}


def voc_colormap(n: int = 256) -> np.ndarray:
    """PASCAL VOC's palette: the bits of the class index spread over the high bits of R, G and B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def write_dataset(out_dir: str | Path, task: str = "all", images: int | None = None, size: int | None = None,
                  seed: int = 0) -> Path:
    """Write the shapes dataset for `task` ("classify", "detect", "segment" or "all") under `out_dir`.

    `images` is the number of images per task (train + val), `size` their side in pixels; None takes the task's demo
    default. Returns `out_dir/<task>` for one task, `out_dir` for "all". An existing task folder is replaced.
    """
    if task not in (*TASKS, "all"):
        raise UserError(f"unknown task {task!r}: expected one of {', '.join((*TASKS, 'all'))}")
    out_dir = Path(out_dir)
    plan = [(t, DEMO[t]["images"] if images is None else images, DEMO[t]["size"] if size is None else size)
            for t in (TASKS if task == "all" else (task,))]
    for t, n, s in plan:  # all arguments checked before anything is written
        _check_args(t, n, s)
    for t, n, s in plan:
        _write_atomically(out_dir / t, lambda d, t=t, n=n, s=s: _WRITERS[t](d, n, s, seed),
                          {"task": t, "images": n, "size": s, "seed": seed, "version": _FORMAT_VERSION})
    return out_dir if task == "all" else out_dir / task


def ensure_demo_dataset(root: str | Path, task: str = "classify") -> Path:
    """The default demo dataset for `task` under `root`, written if missing or incomplete; returns `root/<task>`."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    target = Path(root) / task
    expected = {"task": task, **DEMO[task], "version": _FORMAT_VERSION}
    if read_marker(target) == expected:
        return target
    return write_dataset(root, task, **DEMO[task])


def read_marker(task_dir: Path) -> dict | None:
    """The parameters a complete task folder was written with, or None if it is missing or incomplete."""
    try:
        return json.loads((Path(task_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_args(task: str, images: int, size: int) -> None:
    if size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {size}")
    minimum = 2 * len(CLASSES) if task == "classify" else _VAL_EVERY
    if images < minimum:
        raise UserError(f"--images must be at least {minimum} for {task} (every class in train and val), got {images}")


def _write_atomically(target: Path, write, marker: dict) -> None:
    """Write into a temporary sibling of `target`, add the marker last, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, plain_mode(directory=True))  # mkdtemp's 0700 would hide the data from other users
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        old = None
        if target.exists():  # replace: move the old one aside, put the new one in, then delete the old one
            old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:  # another process (e.g. another rank) put a complete copy there first
            if read_marker(target) != marker:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rng(seed: int, task: str, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, TASKS.index(task), index))


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, "RGB").save(path, format="JPEG", quality=_JPEG_QUALITY)


def _is_val(index: int) -> bool:
    return index % _VAL_EVERY == _VAL_EVERY - 1


def _write_classify(root: Path, images: int, size: int, seed: int) -> None:
    k = len(CLASSES)
    # Labels are balanced and interleaved (image i has class i mod K); val takes every 5th image of each class,
    # and at least one, so every class is in both splits.
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
    for i in range(images):
        label, j = i % k, i // k
        per_class = len(range(label, images, k))
        val = _is_val(j) or (j == per_class - 1 and per_class < _VAL_EVERY)
        scene = classification_scene(_rng(seed, "classify", i), size, label=label)
        _save_jpeg(scene.image, root / ("val" if val else "train") / CLASSES[label] / f"{i:06d}.jpg")


def _scenes(task: str, images: int, size: int, seed: int):
    max_objects, radius = (6, (0.08, 0.28)) if task == "detect" else (4, (0.12, 0.34))
    for i in range(images):
        yield i, multi_object_scene(_rng(seed, task, i), size, max_objects, radius)


def _write_detect(root: Path, images: int, size: int, seed: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(CATEGORY_IDS, CLASSES)]
    splits = {s: {"info": {"description": "mnv2 synthetic shapes", "version": str(_FORMAT_VERSION)},
                  "licenses": [], "images": [], "annotations": [], "categories": categories} for s in ("train", "val")}
    ann_id = 0
    for i, scene in _scenes("detect", images, size, seed):
        name = f"{i:06d}.jpg"
        _save_jpeg(scene.image, root / "images" / name)
        split = splits["val" if _is_val(i) else "train"]
        split["images"].append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for k, shape in enumerate(scene.shapes):
            mask = scene.owner == k
            ys, xs = np.nonzero(mask)
            ann_id += 1
            split["annotations"].append({
                "id": ann_id, "image_id": i + 1, "category_id": CATEGORY_IDS[shape.kind],
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                "area": int(mask.sum()), "iscrowd": 0, "segmentation": _uncompressed_rle(mask)})
    for s, data in splits.items():
        (root / "annotations" / f"instances_{s}.json").write_text(json.dumps(data))


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major flattened mask, starting with a run of zeros."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _label_map(scene: Scene) -> np.ndarray:
    """Class index per pixel (0 background, 1..K), with 255 on the pixels where two regions meet (VOC's void)."""
    labels = np.zeros(scene.owner.shape, dtype=np.uint8)
    for k, shape in enumerate(scene.shapes):
        labels[scene.owner == k] = shape.kind + 1
    # A pixel is void if any 4-neighbour belongs to a different region (a different shape or the background).
    owner = np.pad(scene.owner, 1, mode="edge")
    centre = owner[1:-1, 1:-1]
    edge = ((owner[:-2, 1:-1] != centre) | (owner[2:, 1:-1] != centre)
            | (owner[1:-1, :-2] != centre) | (owner[1:-1, 2:] != centre))
    labels[edge] = 255
    return labels


def _write_segment(root: Path, images: int, size: int, seed: int) -> None:
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    palette = voc_colormap().ravel().tolist()
    ids = {"train": [], "val": []}
    for i, scene in _scenes("segment", images, size, seed):
        stem = f"{i:06d}"
        _save_jpeg(scene.image, root / "JPEGImages" / f"{stem}.jpg")
        mask = Image.fromarray(_label_map(scene), "P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{stem}.png")
        ids["val" if _is_val(i) else "train"].append(stem)
    for split, names in ids.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "labels.txt").write_text("".join(f"{n}\n" for n in ("background", *CLASSES)))


_WRITERS = {"classify": _write_classify, "detect": _write_detect, "segment": _write_segment}
