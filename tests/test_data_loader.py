"""The one DataLoader of every task (data/loader.py): a worker's one-line data error comes out as that error, of its
own class, and holds nothing that keeps the worker processes alive."""

import gc
import weakref

import pytest
import torch
from torch.utils.data import Dataset

from mnv2.data.images import BadImageError
from mnv2.data.loader import Loader, build_loader
from mnv2.data.voc import SegmentationDataError


class Failing(Dataset):
    """Sample 3 raises `error` (in the worker process that loads it)."""

    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 3:
            raise self.error
        return torch.full((2,), float(i))


@pytest.mark.parametrize("error", [BadImageError("/data/a.jpg", "truncated"),
                                   SegmentationDataError("/data/a.png: mask values 30 are not classes")],
                         ids=["image", "mask"])
def test_a_workers_error_is_one_line_of_its_class_and_frees_the_workers(error):
    loader = build_loader(Failing(error), batch_size=2, num_workers=1)
    assert isinstance(loader, Loader) and loader.persistent_workers
    batches, caught = 0, None
    try:
        for _ in loader:
            batches += 1
    except type(error) as e:
        caught = e
    assert batches == 1  # the second batch holds sample 3
    assert type(caught) is type(error) and str(caught) == str(error)  # one line, as the dataset raised it
    assert caught.__cause__ is None and caught.__context__ is None
    workers = weakref.ref(loader._iterator)
    caught = None
    gc.disable()  # no cyclic collection: only reference counting may release the workers' iterator
    try:
        del loader
        assert workers() is None
    finally:
        gc.enable()


def test_sampler_orders_and_seed_repeats():
    data = list(range(10))
    order = [9, 1, 5, 3]
    loader = build_loader(data, batch_size=2, num_workers=0, sampler=order, shuffle=True)  # the sampler wins
    assert [b.tolist() for b in loader] == [[9, 1], [5, 3]]
    first = [b.tolist() for b in build_loader(data, batch_size=5, num_workers=0, shuffle=True, seed=3)]
    assert first == [b.tolist() for b in build_loader(data, batch_size=5, num_workers=0, shuffle=True, seed=3)]
    assert sorted(i for batch in first for i in batch) == data
