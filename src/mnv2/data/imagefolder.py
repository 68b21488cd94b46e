"""An ImageFolder / ImageNet-layout classification dataset: `root/<split>/<class>/<image>` (or `root/<class>/...`).

It finds the same classes and files as `torchvision.datasets.ImageFolder` (sorted class folders, files walked
recursively with torchvision's image extensions), except that hidden folders (".ipynb_checkpoints", ".DS_Store"...)
are never classes. What it adds is what a user's folder needs: one-line errors naming the path for a missing or
empty folder, and a policy for images that do not decode.

Bad images with `on_bad_image="skip"`: the sample is replaced by the next readable one (so batches keep their shape)
and recorded. Loading happens in DataLoader worker processes, so each skip is appended as one line to a small log
file created by the dataset in the main process (append-mode writes of one short line are atomic on local disks, so
concurrent workers do not interleave). `dataset.bad_images()` reads it back as a `BadImageReport` at any time, e.g. at
the end of an epoch; the file is removed when the dataset object that created it is garbage-collected.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as F

from ..errors import UserError
from .images import BadImageError, load_image

BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass
class BadImageReport:
    """Distinct unreadable images met so far: how many, the first few `(path, reason)`."""

    count: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        if not self.count:
            return "no unreadable images"
        shown = "; ".join(f"{p} ({r})" for p, r in self.examples)
        more = f" and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        return f"{self.count} unreadable image{'s' if self.count != 1 else ''} skipped: {shown}{more}"


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(directory: Path) -> list[str]:
    """Sorted names of the class folders in `directory`, or a UserError naming it."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such dataset folder" if not directory.exists()
                        else f"{directory}: not a folder")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = sum(1 for e in os.scandir(directory) if e.is_file() and is_image_file(e.name))
        hint = f" (it holds {loose} images directly: put them in one sub-folder per class)" if loose else ""
        raise UserError(f"{directory}: no class folders, expected {directory}/<class>/<images>{hint}")
    return classes


def list_images(class_dir: Path) -> list[str]:
    """Image files under `class_dir`, walked recursively in sorted order (as torchvision does)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return found


def split_dir(root: str | Path, split: str | None) -> Path:
    """`root/split` (or `root`), checked to exist, with errors that say which layout was expected."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such dataset folder")
    if split is None:
        return root
    directory = root / split
    if not directory.is_dir():
        raise UserError(f"{directory}: split folder not found (expected {root}/{split}/<class>/<images>)")
    return directory


def make_samples(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index)]) for an ImageFolder directory; an empty class folder is an error."""
    classes = find_classes(directory)
    samples = []
    for idx, name in enumerate(classes):
        files = list_images(directory / name)
        if not files:
            raise UserError(f"{directory / name}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} files)")
        samples.extend((f, idx) for f in files)
    return classes, samples


class ImageFolderDataset(Dataset):
    """`(image, label)` pairs from an ImageFolder tree. Images are decoded to uint8 CHW tensors (RGB) and passed to
    `transform` (a torchvision.transforms.v2 pipeline, e.g. `train_preset`); without one, the uint8 tensor is
    returned.

    `min_size`: let JPEGs decode at a reduced scale as long as both sides stay >= min_size (see `images.load_image`);
    useful for evaluation, where the resize target is known.
    """

    def __init__(self, root: str | Path, split: str | None, transform=None, on_bad_image: str = "error",
                 min_size: int | None = None):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        self.root = split_dir(root, split)
        self.classes, self.samples = make_samples(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.transform, self.on_bad_image, self.min_size = transform, on_bad_image, min_size
        self._bad_log = BadImageLog() if on_bad_image == "skip" else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        (_, label), image = first_readable(
            self.samples, index, lambda sample: F.pil_to_tensor(load_image(sample[0], self.min_size)), self._bad_log,
            lambda: UserError(f"{self.root}: none of the {len(self.samples)} images can be read"))
        return (self.transform(image) if self.transform is not None else image), label

    def bad_images(self, max_examples: int | None = 5) -> BadImageReport:
        """The distinct images skipped so far, by any process loading this dataset."""
        return self._bad_log.report(max_examples) if self._bad_log is not None else BadImageReport()


class BadImageLog:
    """The skip records shared by a dataset's loading processes (see the module docstring). Each dataset that skips
    bad images (`ImageFolderDataset`, `coco.CocoDetection`, `voc.SegmentationDataset`) creates one in the main process."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="mnv2-bad-images-", suffix=".tsv")
        os.close(fd)
        weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    def record(self, error: BadImageError) -> None:
        reason = " ".join(error.reason.split())  # one line per record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{error.path}\t{reason}\n")

    def report(self, max_examples: int | None = 5) -> BadImageReport:
        seen: dict[str, str] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    path, _, reason = line.rstrip("\n").partition("\t")
                    seen.setdefault(path, reason)
        except FileNotFoundError:
            pass
        return BadImageReport(len(seen), list(seen.items())[:max_examples])


def first_readable(items: list, index: int, read, log: BadImageLog | None, none_readable):
    """(item, read(item)) for `items[index]`; with a `log` (on_bad_image="skip") the first item after it, wrapping
    around, whose image reads, each unreadable one recorded in `log` (the batch keeps its size). Without a log the
    BadImageError propagates; when no item reads, `none_readable()` is raised."""
    for offset in range(len(items)):
        item = items[(index + offset) % len(items)]
        try:
            return item, read(item)
        except BadImageError as e:
            if log is None:
                raise
            log.record(e)
    raise none_readable()


def _remove_if_owner(path: str, pid: int) -> None:
    # Forked worker processes inherit the finalizer; only the process that created the log may remove it.
    if os.getpid() == pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def scan_images(paths: list[str]) -> BadImageReport:
    """Decode every file in `paths` and report the ones that fail (used by `mnv2 data check`)."""
    bad = []
    for p in paths:
        try:
            load_image(p)
        except BadImageError as e:
            bad.append((e.path, e.reason))
    return BadImageReport(len(bad), bad)
