"""ImageFolderDataset and its DataLoader: one-line errors naming the path, bad-image policies across worker processes,
reproducible loading."""

import shutil

import pytest
import torch

from mnv2.data import BadImageError, ImageFolderDataset, build_classification_loader, train_preset, write_dataset
from mnv2.errors import UserError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src")
    return write_dataset(out, "classify", images=32, size=32, seed=0)  # 8 classes, 24 train / 8 val


@pytest.fixture
def folder(tmp_path, source):
    shutil.copytree(source, tmp_path / "ds")
    return tmp_path / "ds"


def one_line_naming(error, path):
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, message


def test_getitem_returns_uint8_chw_tensor_and_label(folder):
    ds = ImageFolderDataset(folder, "train")
    image, label = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert ds.classes[label] == ds.samples[5][0].split("/")[-2]
    x, y = ImageFolderDataset(folder, "train", transform=train_preset(24))[5]
    assert x.dtype == torch.float32 and x.shape == (3, 24, 24) and y == label


def test_flat_layout_without_split(folder):
    ds = ImageFolderDataset(folder / "val", None)
    assert len(ds) == 8 and len(ds.classes) == 8


def test_layout_errors_name_the_path(folder, tmp_path):
    with pytest.raises(UserError) as e:
        ImageFolderDataset(tmp_path / "missing", "train")
    one_line_naming(e.value, tmp_path / "missing")
    with pytest.raises(UserError) as e:
        ImageFolderDataset(folder, "test")
    one_line_naming(e.value, folder / "test")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="no class folders") as e:
        ImageFolderDataset(tmp_path / "flat", None)
    one_line_naming(e.value, tmp_path / "flat")
    for f in (folder / "train" / "star").iterdir():
        f.unlink()
    (folder / "train" / "star" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="empty class folder") as e:
        ImageFolderDataset(folder, "train")
    one_line_naming(e.value, folder / "train" / "star")
    with pytest.raises(UserError):
        ImageFolderDataset(folder, "val", on_bad_image="ignore")


def corrupt(folder, names):
    paths = []
    for cls, idx in names:
        p = sorted((folder / "train" / cls).iterdir())[idx]
        p.write_bytes(p.read_bytes()[:300])  # truncated JPEG
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_error_policy_raises_one_line_user_error_naming_the_file(folder, workers):
    (bad,) = corrupt(folder, [("ring", 1)])
    loader = build_classification_loader(folder, "train", train_preset(32), batch_size=8, shuffle=False,
                                         num_workers=workers, on_bad_image="error")
    error = first_error(loader)
    assert isinstance(error, BadImageError) and error.path == bad
    one_line_naming(error, bad)


def first_error(loader):
    """Iterate until a UserError; return it without its traceback, so no frame keeps the loader and its worker
    processes alive after the test (pytest.raises would)."""
    try:
        for _ in loader:
            pass
    except UserError as e:
        e.__traceback__ = None
        return e
    raise AssertionError("no error raised")


def test_skip_policy_with_worker_processes_reports_count_and_names(folder):
    bad = corrupt(folder, [("circle", 0), ("hexagon", 2), ("triangle", 1)])
    loader = build_classification_loader(folder, "train", train_preset(32), batch_size=5, shuffle=True,
                                         num_workers=2, on_bad_image="skip", drop_last=False)
    for epoch in range(2):  # persistent workers hit the same files twice: each is still counted once
        sizes = [len(y) for _, y in loader]
        assert sizes == [5, 5, 5, 5, 4]  # every sample replaced, none dropped
    report = loader.dataset.bad_images()
    assert report.count == 3
    assert sorted(p for p, _ in report.examples) == sorted(bad)
    text = report.format()
    assert "3 unreadable images" in text and all(p in text for p in bad)
    assert ImageFolderDataset(folder, "val", on_bad_image="skip").bad_images().count == 0


def test_skip_policy_when_nothing_is_readable(folder):
    for p in (folder / "val").rglob("*.jpg"):
        p.write_bytes(b"junk")
    ds = ImageFolderDataset(folder, "val", on_bad_image="skip")
    with pytest.raises(UserError, match="none of the 8 images"):
        ds[0]


def test_same_seed_same_batches(folder):
    def first_two(seed):
        loader = build_classification_loader(folder, "train", train_preset(24, color_jitter=0.3), batch_size=6,
                                             shuffle=True, num_workers=2, on_bad_image="error", seed=seed)
        it = iter(loader)
        return [next(it) for _ in range(2)]

    a, b, c = first_two(1), first_two(1), first_two(2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])
