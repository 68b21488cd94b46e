"""The one DataLoader of every task, for training, evaluation during training and `mnv2 eval`: worker processes kept
alive across epochs, seeded so a run can be repeated, and a worker's unreadable image re-raised as one line."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import UserError


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a worker from the seed PyTorch gave it (itself derived from the
    loader's generator), so random augmentations that use them repeat from run to run."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class Loader(DataLoader):
    """A DataLoader that re-raises a worker's `UserError` (an unreadable image, a bad mask: one line naming the file,
    recovered by the error's class from PyTorch's multi-line message) free of the frames it was raised through.

    PyTorch's re-raised exception sits in cycles with its own frames (which hold the worker iterator) and with the
    iterating frame. Left to the cyclic garbage collector, the workers' shutdown then ran inside a collection and was
    measured to stall 5 s per worker; without the cycles the workers stop as soon as the loader is released.
    """

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as e:
                error = e.with_traceback(None)  # drop the frames that hold the iterator
                error.__context__ = error.__cause__ = None
            else:
                yield batch
                continue
            del it
            try:
                raise error
            finally:
                del error  # this frame must not hold the exception whose traceback holds this frame


def build_loader(dataset, batch_size: int, num_workers: int, *, collate_fn=None, sampler=None, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, pin_memory: bool = False) -> Loader:
    """The loader of every task: `mnv2 train` (its training and validation data), and `mnv2 eval`. With a `sampler`
    (the trainer's resumable or sharded ones) the sampler orders the samples and `shuffle` is ignored."""
    return Loader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def build_classification_loader(root, split: str | None, transform, batch_size: int, shuffle: bool, num_workers: int,
                                on_bad_image: str = "error", sampler=None, drop_last: bool = False, collate_fn=None,
                                seed: int = 0, min_size: int | None = None) -> Loader:
    """`build_loader` over `ImageFolderDataset(root, split, transform, on_bad_image)` (`mnv2 eval` of a classifier);
    `loader.dataset` gives the classes and, after or during the epoch, `bad_images()`."""
    from .imagefolder import ImageFolderDataset  # torchvision: imported when a classifier's data is read

    dataset = ImageFolderDataset(root, split, transform=transform, on_bad_image=on_bad_image, min_size=min_size)
    return build_loader(dataset, batch_size, num_workers, collate_fn=collate_fn, sampler=sampler, shuffle=shuffle,
                        drop_last=drop_last, seed=seed, pin_memory=torch.cuda.is_available())
