"""A data order that survives a kill: per-epoch shuffles, per-sample augmentation seeds, and a start position.

Each sample's random augmentation is drawn from a generator seeded by (seed, epoch, index), not from a worker's running
RNG stream. So the images of a step do not depend on the number of workers, on which rank loads them, or on whether
the run was resumed in the middle of the epoch: resuming only needs the epoch and the number of batches already done.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed, different for every (run seed, epoch, sample), stable across processes and platforms."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffle per `set_epoch`, this rank's share) that yields `(index, sample seed)` keys and can
    start `start` samples into this rank's share of the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def __iter__(self):
        for i in list(super().__iter__())[self.start:]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Evaluation: rank r takes samples r, r + world, ... in order, without the padding DistributedSampler adds (which
    would count some images twice)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """Wraps a dataset so that `ds[(index, seed)]` draws the sample's random transform from `seed`.

    The CPU generator's state is put back afterwards, so loading in the main process (num_workers=0) leaves the
    training RNG untouched. (`torch.manual_seed` would also queue seeds for every accelerator: ~0.2 ms per call.)
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved)
