"""Semantic segmentation data: PASCAL VOC 2012, its SBD extension ("train_aug"), any images + index-masks folder.

Layouts read (paper section 6.3 trains on VOC 2012 + SBD and reports VOC 2012 val):
- VOC 2012: `DIR/VOCdevkit/VOC2012/` (or DIR itself when it holds `JPEGImages/`): `JPEGImages/<id>.jpg`,
  `SegmentationClass/<id>.png` (palette PNGs whose pixel values are the class indices, 255 = void),
  `ImageSets/Segmentation/{train,val,trainval}.txt`. A `labels.txt` there (one name per line, background first)
  replaces VOC's 21 class names; the embedded shapes set (`synthetic.py`, `segment/`) writes one.
- SBD (Hariharan et al. 2011): `DIR/benchmark_RELEASE/dataset/` with `img/<id>.jpg`, `cls/<id>.mat`, `train.txt`,
  `val.txt`. Each .mat holds a 1x1 MATLAB struct `GTcls` whose field `Segmentation` is the class map (0..20, no 255).
- "train_aug" = VOC train + SBD train + SBD val, minus VOC val, each id once (10,582 images on the real data), as
  DeepLab builds it. An id that VOC annotates (in VOC's train list) is read from VOC -- its JPEG and its PNG, with
  VOC's own 255 boundaries -- even when SBD annotates it too: the dataset's own annotation is preferred. The
  SBD-only ids are read from SBD (its JPEG and .mat), as DeepLab's SegmentationClassAug does for them.
- `folder_samples`: any images folder + masks folder of PNG index masks, paired by file stem.

Every listed file is checked to exist when the sample list is built; masks are checked as they are read (size equal
to the image's, values class indices or 255, a readable PNG or .mat), each failure one line naming the file, also
when it happens in a DataLoader worker. Unreadable images follow `on_bad_image` as in `coco.CocoDetection`; a bad
mask is a bad label and always raises.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..errors import UserError
from .imagefolder import BAD_IMAGE_POLICIES, BadImageLog, BadImageReport, first_readable, is_image_file
from .images import load_image
from .segmentation_transforms import IGNORE_INDEX

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
SPLITS = ("train", "val", "trainval", "train_aug")
_INDEX_MODES = ("P", "L", "I;16", "I;16B", "I;16L", "I;16N", "I")  # PNG modes whose pixel values are indices
_SBD_FILES = ("cls/", "img/", "train.txt", "val.txt")
_T = Image.Transpose
# The inverse of the EXIF orientations that swap width and height (see `_in_mask_frame`).
_UNDO_SWAP = {5: _T.TRANSPOSE, 6: _T.ROTATE_90, 7: _T.TRANSVERSE, 8: _T.ROTATE_270}


@dataclass(frozen=True)
class VocRoot:
    voc_dir: Path  # the folder holding JPEGImages/, SegmentationClass/, ImageSets/Segmentation/
    sbd_dir: Path | None  # SBD's dataset/ folder (cls/, img/, train.txt, val.txt), None when absent
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class SegSample:
    id: str
    image_path: Path
    mask_path: Path
    mask_kind: str  # "png" (index PNG) or "mat" (SBD's GTcls struct)


class SegmentationDataError(UserError):
    """A sample that cannot be used (a bad mask, or not one readable image), as one line naming the file.

    Like `BadImageError`, it takes the multi-line message PyTorch's DataLoader builds when it re-raises a worker's
    exception in the main process ("Caught ... in DataLoader worker ... Original Traceback ...") and keeps its last
    line's message, so the CLI still prints one line.
    """

    def __init__(self, message: str):
        lines = str(message).strip().splitlines() or [""]
        if len(lines) > 1:
            prefix, sep, rest = lines[-1].partition(": ")
            message = rest if sep and prefix.endswith(type(self).__name__) else lines[-1]
        super().__init__(message)


def find_voc(root, sbd=None) -> VocRoot:
    """The VOC 2012 folder under `root` (`root/VOCdevkit/VOC2012/` or `root` itself), SBD's `dataset/` folder
    (`root/benchmark_RELEASE/dataset/`, or `sbd`: that folder or one holding it), and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such dataset folder")
    candidates = (root / "VOCdevkit" / "VOC2012", root)
    voc_dir = next((d for d in candidates if (d / "JPEGImages").is_dir()), None)
    if voc_dir is None:
        raise UserError(f"{root}: no PASCAL VOC layout found: expected {candidates[0]}/JPEGImages/ (VOCdevkit as "
                        f"extracted) or {root}/JPEGImages/, with SegmentationClass/ and ImageSets/Segmentation/ beside")
    if sbd is None:
        sbd_dir = root / "benchmark_RELEASE" / "dataset"
        sbd_dir = sbd_dir if sbd_dir.is_dir() else None
    else:
        sbd = Path(sbd)
        sbd_dir = next((d for d in (sbd, sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset")
                        if (d / "cls").is_dir()), None)
        if sbd_dir is None:
            raise UserError(f"{sbd}: no SBD layout found: expected {sbd}/cls/ or {sbd}/benchmark_RELEASE/dataset/cls/")
    return VocRoot(voc_dir, sbd_dir, class_names_in(voc_dir))


def class_names_in(voc_dir: Path) -> tuple[str, ...]:
    """The class names of `voc_dir/labels.txt` (background first), or VOC's 21 when there is no such file."""
    path = Path(voc_dir) / "labels.txt"
    if not path.is_file():
        return VOC_CLASSES
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    names = tuple(line.strip() for line in lines)
    if "" in names or len(set(names)) != len(names) or not 2 <= len(names) <= IGNORE_INDEX:
        raise UserError(f"{path}: expected 2 to {IGNORE_INDEX} distinct class names, one per line with background "
                        f"first and no blank lines; got {len(names)} lines")
    return names


def read_ids(list_file: Path) -> list[str]:
    """The ids of a split list (one per line, blank lines ignored, each id once), or a UserError naming the file."""
    try:
        text = Path(list_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{list_file}: no such list file (expected one image id per line)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{list_file}: unreadable list file ({e})") from None
    ids = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if len(line.split()) > 1:
            raise UserError(f"{list_file}:{n}: expected one image id per line, got {line[:80]!r}")
        if line:
            ids.append(line)
    if not ids:
        raise UserError(f"{list_file}: no image ids in the list file")
    return list(dict.fromkeys(ids))


def segmentation_samples(root: VocRoot, split: str) -> list[SegSample]:
    """The samples of `split` (train, val, trainval, or train_aug, which needs SBD), each file checked to exist."""
    if split not in SPLITS:
        raise UserError(f"unknown segmentation split {split!r}: expected one of {', '.join(SPLITS)}")
    lists = root.voc_dir / "ImageSets" / "Segmentation"
    if split != "train_aug":
        list_file = lists / f"{split}.txt"
        listed = [(i, list_file) for i in read_ids(list_file)]
        samples = [_voc_sample(root.voc_dir, i) for i, _ in listed]
    else:
        if root.sbd_dir is None:
            base = root.voc_dir.parent.parent if root.voc_dir.parent.name == "VOCdevkit" else root.voc_dir
            raise UserError(f"split 'train_aug' needs SBD's extra annotations: expected "
                            f"{base / 'benchmark_RELEASE' / 'dataset'}/ with {', '.join(_SBD_FILES)}, not found")
        voc_train, voc_val = read_ids(lists / "train.txt"), set(read_ids(lists / "val.txt"))
        source = dict.fromkeys(voc_train, lists / "train.txt")
        for name in ("train.txt", "val.txt"):
            for i in read_ids(root.sbd_dir / name):
                source.setdefault(i, root.sbd_dir / name)
        listed = sorted((i, f) for i, f in source.items() if i not in voc_val)
        voc_ids = set(voc_train)
        samples = [_voc_sample(root.voc_dir, i) if i in voc_ids else _sbd_sample(root.sbd_dir, i) for i, _ in listed]
    _check_exist(samples, [f for _, f in listed], split)
    return samples


def _voc_sample(voc_dir: Path, sample_id: str) -> SegSample:
    return SegSample(sample_id, voc_dir / "JPEGImages" / f"{sample_id}.jpg",
                     voc_dir / "SegmentationClass" / f"{sample_id}.png", "png")


def _sbd_sample(sbd_dir: Path, sample_id: str) -> SegSample:
    return SegSample(sample_id, sbd_dir / "img" / f"{sample_id}.jpg", sbd_dir / "cls" / f"{sample_id}.mat", "mat")


def _check_exist(samples: list[SegSample], list_files: list[Path], split: str) -> None:
    """Every image and mask present, checked against one listing per folder (cheap for 10,000 samples)."""
    listings: dict[Path, set[str]] = {}

    def exists(path: Path) -> bool:
        if path.parent not in listings:
            listings[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        return path.name in listings[path.parent]

    missing = [(s, f, p) for s, f in zip(samples, list_files) for p in (s.image_path, s.mask_path) if not exists(p)]
    if missing:
        sample, list_file, path = missing[0]
        raise UserError(f"{list_file}: id {sample.id!r} has no file {path} ({_count(missing, 'missing file')} among "
                        f"the {len(samples)} ids of split {split!r})")


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def folder_samples(images_dir, masks_dir, list_file=None) -> list[SegSample]:
    """Samples from an images folder and a folder of PNG index masks, paired by file stem. With `list_file`, the
    ids it lists (each must have both files); without, every mask's stem (each must have an image; images without
    a mask are left out, as VOC's JPEGImages holds many unannotated images)."""
    images = _by_stem(Path(images_dir), is_image_file)
    masks = _by_stem(Path(masks_dir), lambda name: name.lower().endswith(".png"))
    if list_file is not None:
        ids = read_ids(Path(list_file))
        missing = [(i, f"{images_dir}/{i}.<image extension>") for i in ids if i not in images]
        missing += [(i, f"{masks_dir}/{i}.png") for i in ids if i not in masks]
        if missing:
            raise UserError(f"{list_file}: id {missing[0][0]!r} has no file {missing[0][1]} "
                            f"({_count(missing, 'missing file')} among its {len(ids)} ids)")
    else:
        ids = sorted(masks)
        if not ids:
            raise UserError(f"{masks_dir}: no .png masks found")
        orphans = [i for i in ids if i not in images]
        if orphans:
            raise UserError(f"{masks[orphans[0]]}: no image {images_dir}/{orphans[0]}.<image extension> for this mask "
                            f"({len(orphans)} of the {len(ids)} masks have no image)")
    return [SegSample(i, images[i], masks[i], "png") for i in ids]


def _by_stem(directory: Path, keep) -> dict[str, Path]:
    if not directory.is_dir():
        raise UserError(f"{directory}: no such folder" if not directory.exists() else f"{directory}: not a folder")
    found: dict[str, Path] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not keep(name):
            continue
        stem = os.path.splitext(name)[0]
        if stem in found:
            raise UserError(f"{directory}: {found[stem].name} and {name} have the same stem: which one is {stem!r}?")
        found[stem] = directory / name
    return found


class SegmentationDataset(Dataset):
    """`transform(image, mask)` per sample: image a `tv_tensors.Image` uint8 [3, H, W] (RGB), mask a
    `tv_tensors.Mask` int64 [H, W] of class indices in 0..num_classes-1 and 255 (void); without a transform, that
    pair. `transform` is e.g. `segmentation_train_preset` / `segmentation_eval_preset`.

    Each mask is checked as it is read: same size as its image, every value a class index or 255, a readable file;
    a failure raises `SegmentationDataError` naming the file. An unreadable image raises `BadImageError`, or with
    `on_bad_image="skip"` is replaced by the next readable sample and recorded (`bad_images()`), as in
    `coco.CocoDetection`.
    """

    def __init__(self, samples, class_names, transform=None, on_bad_image: str = "error"):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        self.samples: list[SegSample] = list(samples)
        if not self.samples:
            raise UserError("no segmentation samples to read")
        self.class_names = tuple(class_names)
        if not 2 <= len(self.class_names) <= IGNORE_INDEX:
            raise UserError(f"segmentation needs 2 to {IGNORE_INDEX} class names (255 is void), "
                            f"got {len(self.class_names)}")
        self.num_classes = len(self.class_names)
        self.transform, self.on_bad_image = transform, on_bad_image
        self._bad_log = BadImageLog() if on_bad_image == "skip" else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample, image = first_readable(
            self.samples, index, lambda s: load_image(s.image_path), self._bad_log,
            lambda: SegmentationDataError(f"none of the {len(self.samples)} images (first "
                                          f"{self.samples[0].image_path}) can be read"))
        return self._pair(sample, image)

    def original_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample `index` at full resolution: its mask's size (the image is read in that frame)."""
        sample = self.samples[index]
        if sample.mask_kind == "png":
            try:
                with Image.open(sample.mask_path) as im:  # the header only
                    return im.height, im.width
            except (OSError, ValueError, SyntaxError) as e:
                raise SegmentationDataError(f"{sample.mask_path}: unreadable mask ({e})") from None
        height, width = read_mask(sample.mask_path, sample.mask_kind).shape
        return int(height), int(width)

    def bad_images(self, max_examples: int | None = 5) -> BadImageReport:
        """The distinct images skipped so far, by any process loading this dataset."""
        return self._bad_log.report(max_examples) if self._bad_log is not None else BadImageReport()

    def _pair(self, sample: SegSample, image: Image.Image):
        mask = read_mask(sample.mask_path, sample.mask_kind)
        image = _in_mask_frame(image, sample, mask.shape)
        invalid = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if mask.dtype.kind == "i":
            invalid |= mask < 0
        if invalid.any():
            values = np.unique(mask[invalid])
            shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise SegmentationDataError(
                f"{sample.mask_path}: mask values {shown} are neither a class index (0..{self.num_classes - 1} for "
                f"{self.num_classes} classes) nor {IGNORE_INDEX} (void)")
        image = tv_tensors.Image(F.pil_to_tensor(image))
        mask = tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))
        return self.transform(image, mask) if self.transform is not None else (image, mask)


def _in_mask_frame(image: Image.Image, sample: SegSample, shape: tuple[int, int]) -> Image.Image:
    """The image in the frame its mask was drawn in, or an error if they cannot be matched.

    `load_image` turns camera photos upright (EXIF orientation). A mask of the upright size is taken as drawn on
    the upright image (what every viewer shows). A mask of the stored size, when the orientation swaps width and
    height, was drawn on the stored pixels (tools that ignore EXIF): the rotation is undone. VOC's JPEGs carry no
    orientation, so neither case changes them.
    """
    height, width = shape
    if image.size == (width, height):
        return image
    with Image.open(sample.image_path) as im:  # the header only: the stored size and its orientation tag
        stored, orientation = im.size, im.getexif().get(0x0112, 1)
    if stored == (width, height) and orientation in _UNDO_SWAP:
        return image.transpose(_UNDO_SWAP[orientation])
    raise SegmentationDataError(f"{sample.mask_path}: mask is {width}x{height} but its image {sample.image_path} is "
                                f"{image.size[0]}x{image.size[1]}")


def read_mask(path: Path, kind: str) -> np.ndarray:
    """The [H, W] integer class map of a mask file: an index PNG ("png") or SBD's GTcls .mat ("mat")."""
    if kind not in ("png", "mat"):
        raise ValueError(f"mask kind must be 'png' or 'mat', got {kind!r}")
    return _read_png_mask(path) if kind == "png" else _read_sbd_mat(path)


def _read_png_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try: truncated files fail here
            mode = im.mode
            # P: the palette indices are the classes (VOC); never convert, which would map them to colours.
            mask = np.asarray(im) if mode in _INDEX_MODES else None
    except FileNotFoundError:
        raise SegmentationDataError(f"{path}: no such mask file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError
        raise SegmentationDataError(f"{path}: unreadable mask ({' '.join(str(e).split()) or type(e).__name__})") \
            from None
    if mask is None:
        colour = " (a colour image: masks store class indices, e.g. VOC's palette PNGs)" if mode.startswith("RGB") \
            else ""
        raise SegmentationDataError(f"{path}: mask mode {mode} is not a class-index image{colour}; expected a "
                                    "palette (P) or grayscale (L) PNG whose pixel values are the class indices")
    return mask


def _read_sbd_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat  # imported here: only SBD's .mat masks need scipy
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path, variable_names=["GTcls"], struct_as_record=False, squeeze_me=False)
    except FileNotFoundError:
        raise SegmentationDataError(f"{path}: no such mask file") from None
    # What scipy's reader raised on truncated and bit-flipped files here, and NotImplementedError for v7.3 (HDF5).
    except (OSError, ValueError, IndexError, TypeError, EOFError, NotImplementedError, zlib.error, MatReadError) as e:
        raise SegmentationDataError(f"{path}: unreadable .mat file ({' '.join(str(e).split()) or type(e).__name__})") \
            from None
    try:  # SBD's layout: a 1x1 struct array GTcls with fields Segmentation, Boundaries, CategoriesPresent
        mask = np.asarray(mat["GTcls"][0, 0].Segmentation)
    except (KeyError, IndexError, AttributeError, TypeError):
        raise SegmentationDataError(f"{path}: no GTcls.Segmentation class map (expected an SBD cls/ .mat file)") \
            from None
    if mask.ndim != 2 or mask.dtype.kind not in "ui" or mask.size == 0:
        raise SegmentationDataError(f"{path}: GTcls.Segmentation is not a 2-D integer class map "
                                    f"(shape {mask.shape}, {mask.dtype})")
    return mask
