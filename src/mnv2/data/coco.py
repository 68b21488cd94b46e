"""COCO-format detection data: finding a split on disk, and a dataset of (image, target) pairs checked up front.

Everything the annotation file could get wrong is checked when the dataset is built, each as one line naming the file
(and the annotation id), so a bad file fails before training starts rather than in a worker hours later. What real COCO
does is accepted: category ids with gaps (1..90 for 80 classes), images without annotations (they train as pure
background), crowd regions (kept with iscrowd=True: the matcher neither rewards nor penalises anchors on them), and the
two zero-height boxes of train2017 (annotations 918 and 2206849), which are dropped and counted in `degenerate`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..errors import UserError
from .imagefolder import BAD_IMAGE_POLICIES, BadImageLog, BadImageReport, first_readable
from .images import BadImageError, load_image

_EXIF_ORIENTATION = 0x0112
_T = Image.Transpose
# The inverse of each EXIF orientation's transpose in `images.load_image` (only 6 and 8 are not their own inverse).
_UNDO_ORIENTATION = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
                     6: _T.ROTATE_90, 7: _T.TRANSVERSE, 8: _T.ROTATE_270}


def find_coco_split(root, split: str, images=None, annotations=None) -> tuple[Path, Path]:
    """(images folder, annotation file) of `split`: explicit `images` / `annotations` paths win; otherwise COCO 2017's
    layout (`root/{split}2017/`, `root/annotations/instances_{split}2017.json`), then the embedded shapes layout
    (`root/images/`, `root/annotations/instances_{split}.json`)."""
    candidates = []
    if root is not None:
        root = Path(root)
        candidates = [(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
                      (root / "images", root / "annotations" / f"instances_{split}.json")]
    if images is not None or annotations is not None or not candidates:
        candidates = list(dict.fromkeys(  # both given: the layouts collapse to one pair
            (Path(images) if images is not None else i, Path(annotations) if annotations is not None else a)
            for i, a in (candidates or [(None, None)])))
    for image_dir, ann_file in candidates:
        if image_dir is not None and ann_file is not None and image_dir.is_dir() and ann_file.is_file():
            return image_dir, ann_file
    looked = "; ".join(f"{i or '(no images folder given)'} + {a or '(no annotation file given)'}"
                       for i, a in candidates)
    raise UserError(f"no COCO {split!r} split found: looked for an images folder + annotation file at {looked}")


class CocoDetection(Dataset):
    """`(image, target)` pairs from a COCO detection annotation file: image float [3, S, S] (uint8 at its own size
    without a transform); target "boxes" float [G, 4] xyxy normalised by the output image's size, "labels" int64
    [G] in 1..C, "iscrowd" bool [G], "image_id" (the file's id) and "orig_size" (height, width) from the file.
    Label l is category `category_ids[l - 1]` (sorted file ids), named `class_names[l - 1]`; `coco` is pycocotools'
    COCO object of the file (for COCOeval), `degenerate` the number of boxes dropped for having no area.

    `transform(image, target)` is a torchvision.transforms.v2 pipeline (e.g. `detection_train_preset`); it receives a
    `tv_tensors.Image` (uint8) and a dict with `tv_tensors.BoundingBoxes` (XYXY pixels), "labels" and "iscrowd".
    `category_ids`: reuse another split's label mapping so val labels match train's: a CocoDetection (its annotation
    file is then named in errors) or a list of ids (e.g. from a checkpoint).
    """

    def __init__(self, images_dir, annotation_file, transform=None, on_bad_image: str = "error", category_ids=None):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        self.images_dir, self.annotation_file = Path(images_dir), Path(annotation_file)
        self.transform, self.on_bad_image = transform, on_bad_image
        data = _read_json(self.annotation_file)
        images, categories = _check_file(data, self.annotation_file)
        self.category_ids, self.class_names = _label_mapping(categories, category_ids, self.annotation_file)
        # Only this file's own categories: an annotation naming another one is an error even if train has it.
        label_of = {cid: label for label, cid in enumerate(self.category_ids, start=1) if cid in categories}
        self.image_ids = sorted(images)
        self.image_info = images
        self.targets, self.degenerate = _pixel_targets(data, images, label_of, self.annotation_file)
        self.coco = _to_pycocotools(data)
        self._bad_log = BadImageLog() if on_bad_image == "skip" else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id, image = first_readable(
            self.image_ids, index, lambda i: self._read(self.image_info[i]), self._bad_log,
            lambda: UserError(f"{self.images_dir}: none of the {len(self.image_ids)} images of "
                              f"{self.annotation_file} can be read"))
        return self._sample(image_id, image)

    def bad_images(self, max_examples: int | None = 5) -> BadImageReport:
        """The distinct images skipped so far, by any process loading this dataset."""
        return self._bad_log.report(max_examples) if self._bad_log is not None else BadImageReport()

    def _read(self, info: dict) -> torch.Tensor:
        """The image's pixels in the frame its boxes were drawn in, as a uint8 CHW tensor.

        The annotation file's width/height decide the frame. COCO's sizes (and its boxes) are those of the stored
        pixels: its annotators worked in 2014 browsers, which ignored EXIF orientation, and pycocotools' and
        torchvision's readers ignore it too. Tools that annotate the upright photo (labelme...) write the upright
        size. So: if the JSON size is the stored size, EXIF orientation is undone (also when the upright size is the
        same, e.g. a 180-degree tag: COCO's convention decides the tie); if it is only the upright size, the upright
        image is used; if it is neither, the file does not match its annotations: a bad image.
        """
        path = self.images_dir / info["file_name"]
        upright = load_image(path)
        with Image.open(path) as im:  # header only: the stored size and the tag that load_image applied
            stored_size, orientation = im.size, im.getexif().get(_EXIF_ORIENTATION, 1)
        want = (info["width"], info["height"])
        if stored_size == want and orientation in _UNDO_ORIENTATION:
            upright = upright.transpose(_UNDO_ORIENTATION[orientation])
        elif upright.size != want:
            raise BadImageError(path, f"decoded size {upright.size[0]}x{upright.size[1]} is not the "
                                      f"{want[0]}x{want[1]} given in {self.annotation_file}")
        return F.pil_to_tensor(upright)

    def _sample(self, image_id: int, image: torch.Tensor):
        info = self.image_info[image_id]
        h, w = info["height"], info["width"]
        boxes, labels, crowd = self.targets[image_id]
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.from_numpy(labels), "iscrowd": torch.from_numpy(crowd)}
        image = tv_tensors.Image(image)
        if self.transform is not None:
            image, target = self.transform(image, target)
        out_h, out_w = image.shape[-2:]
        scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
        boxes = (target["boxes"].as_subclass(torch.Tensor).float() / scale).clamp_(0.0, 1.0)
        return image.as_subclass(torch.Tensor), {
            "boxes": boxes, "labels": target["labels"], "iscrowd": target["iscrowd"], "image_id": image_id,
            "orig_size": (h, w)}


def _read_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such annotation file") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_file(data, path: Path) -> tuple[dict[int, dict], dict[int, str]]:
    """The images by id and the category names by id, after checking the file's structure."""
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise UserError(f"{path}: not a COCO detection file (no {', '.join(repr(k) for k in missing)} list)")
    images: dict[int, dict] = {}
    for info in data["images"]:
        image_id = info.get("id") if isinstance(info, dict) else None
        if not isinstance(image_id, int) or not isinstance(info.get("file_name"), str) or not all(
                _is_number(info.get(k)) and info[k] > 0 for k in ("width", "height")):
            raise UserError(f"{path}: image entry {str(info)[:80]} needs an integer id, a file_name and positive "
                            "width and height")
        if image_id in images:
            raise UserError(f"{path}: image id {image_id} appears twice in 'images'")
        images[image_id] = info
    categories: dict[int, str] = {}
    for cat in data["categories"]:
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or cid in categories:
            raise UserError(f"{path}: category {str(cat)[:80]} needs an integer id that no other category has")
        categories[cid] = str(cat.get("name", cid))
    return images, categories


def _label_mapping(categories: dict[int, str], given, path: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids in label order, their names): this file's sorted ids, or the mapping given (e.g. train's)."""
    if given is None:
        ids = tuple(sorted(categories))
        return ids, tuple(categories[c] for c in ids)
    source, names = "the category ids given", {}
    if isinstance(given, CocoDetection):
        source, names = str(given.annotation_file), dict(zip(given.category_ids, given.class_names))
        given = given.category_ids
    ids = tuple(int(c) for c in given)
    if len(set(ids)) != len(ids):
        raise UserError(f"category_ids for {path} repeat an id: {list(ids)}")
    extra = sorted(set(categories) - set(ids))
    if extra:
        raise UserError(f"{path}: categories {extra} ({', '.join(categories[c] for c in extra)}) are not in "
                        f"{source}, whose label mapping this split reuses")
    return ids, tuple(names.get(c, categories.get(c, str(c))) for c in ids)


def _pixel_targets(data: dict, images: dict, label_of: dict, path: Path):
    """Per image: (boxes [G, 4] float32 xyxy pixels clipped to the image, labels [G] int64, iscrowd [G] bool), and
    the number of boxes dropped for having no area (zero width or height, or nothing left inside the image)."""
    per_image: dict[int, list] = {i: [] for i in images}
    seen_ids, degenerate = set(), 0
    for n, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{path}: annotation {ann_id}" if ann_id is not None else f"{path}: annotation #{n} (no id)"
        if not isinstance(ann, dict) or ann_id is None:
            raise UserError(f"{where} is not an object with an id")
        if ann_id in seen_ids:
            raise UserError(f"{where} appears twice")
        seen_ids.add(ann_id)
        if ann.get("image_id") not in per_image:
            raise UserError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in label_of:
            raise UserError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise UserError(f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, width, height]")
        if bbox[2] < 0 or bbox[3] < 0:
            raise UserError(f"{where}: bbox {bbox} has a negative width or height")
        info = images[ann["image_id"]]
        x, y, bw, bh = bbox
        box = (max(x, 0), max(y, 0), min(x + bw, info["width"]), min(y + bh, info["height"]))
        if box[2] <= box[0] or box[3] <= box[1]:  # zero-size, or entirely outside the image
            degenerate += 1
            continue
        per_image[ann["image_id"]].append((box, label_of[ann["category_id"]], bool(ann.get("iscrowd", 0))))
    targets = {}
    for image_id, anns in per_image.items():
        targets[image_id] = (np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                             np.array([a[1] for a in anns], dtype=np.int64),
                             np.array([a[2] for a in anns], dtype=bool))
    return targets, degenerate


def _to_pycocotools(data: dict):
    """pycocotools' COCO object on the already parsed file (what `COCO(path)` does, without parsing it again)."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise UserError("COCO detection data needs pycocotools: pip install 'mnv2[coco]'") from None
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
        coco.createIndex()
    return coco
