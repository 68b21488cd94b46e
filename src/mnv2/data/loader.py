"""The classification DataLoader: worker processes kept alive across epochs, seeded so a run can be repeated."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from .imagefolder import ImageFolderDataset
from .images import BadImageError


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a worker from the seed PyTorch gave it (itself derived from the
    loader's generator), so random augmentations that use them repeat from run to run."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class ClassificationLoader(DataLoader):
    """A DataLoader that re-raises a worker's `BadImageError` as a fresh one-line error with no reference cycle.

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
            except BadImageError as e:
                e.__traceback__ = None  # drop the frames that hold the iterator
                error = BadImageError(e.path, e.reason)
            else:
                yield batch
                continue
            del it
            try:
                raise error
            finally:
                del error  # this frame must not hold the exception whose traceback holds this frame


def build_classification_loader(root, split: str | None, transform, batch_size: int, shuffle: bool, num_workers: int,
                                on_bad_image: str = "error", sampler=None, drop_last: bool = False, collate_fn=None,
                                seed: int = 0, min_size: int | None = None) -> DataLoader:
    """A DataLoader over `ImageFolderDataset(root, split, transform, on_bad_image)`; `loader.dataset` gives the
    classes and, after or during the epoch, `bad_images()`. With a `sampler` (e.g. DistributedSampler) the sampler
    does the shuffling."""
    dataset = ImageFolderDataset(root, split, transform=transform, on_bad_image=on_bad_image, min_size=min_size)
    return ClassificationLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
