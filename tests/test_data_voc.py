"""PASCAL VOC 2012 + SBD segmentation data: layouts found, masks read as exact class indices (palette PNGs and SBD's
.mat structs), train_aug built as DeepLab builds it, every bad input one line naming the file."""

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image

from mnv2.data.images import BadImageError
from mnv2.data.shapes import CLASSES as SHAPE_CLASSES
from mnv2.data.synthetic import voc_colormap, write_dataset
from mnv2.data.voc import (
    VOC_CLASSES,
    SegmentationDataError,
    SegmentationDataset,
    SegSample,
    find_voc,
    folder_samples,
    read_mask,
    segmentation_samples,
)
from mnv2.errors import UserError

H, W = 12, 16


def label_map(seed: int, values=(0, 1, 15, 20), void: bool = True) -> np.ndarray:
    """A random class map with a few 255 (void) pixels, as VOC draws on object boundaries."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array(values, dtype=np.uint8), size=(H, W))
    if void:
        labels[rng.random((H, W)) < 0.15] = 255
    return labels


def save_png_mask(labels: np.ndarray, path, mode: str = "P") -> None:
    im = Image.fromarray(labels, "L")
    if mode == "P":  # VOC's files: palette PNGs whose pixel values are the class indices
        im = im.convert("P")
        im.putpalette(voc_colormap().ravel().tolist())
    im.save(path)


def save_image(path, size=(W, H), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path, quality=95)


def write_voc(root, masks: dict, splits: dict, devkit: bool = True):
    """A VOC 2012 tree under `root` (VOCdevkit/VOC2012 or flat): a JPEG and a palette PNG per id in `masks`."""
    voc = root / "VOCdevkit" / "VOC2012" if devkit else root
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    for n, (sample_id, labels) in enumerate(masks.items()):
        save_image(voc / "JPEGImages" / f"{sample_id}.jpg", seed=n)
        save_png_mask(labels, voc / "SegmentationClass" / f"{sample_id}.png")
    for split, ids in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc


def save_sbd_mat(labels: np.ndarray, path) -> None:
    """SBD's cls/<id>.mat: MATLAB v5 (compressed), a 1x1 struct GTcls with Boundaries (20x1 cell of sparse logical
    maps, one per class), Segmentation (HxW uint8) and CategoriesPresent (column of the classes present)."""
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        edge = (labels == c + 1) & (np.roll(labels, 1, axis=0) != c + 1)
        boundaries[c, 0] = scipy.sparse.csc_matrix(edge)
    present = np.array([c for c in np.unique(labels) if 0 < c < 255], dtype=np.uint8).reshape(-1, 1)
    gt = {"Boundaries": boundaries, "Segmentation": labels.astype(np.uint8), "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": gt}, do_compression=True)


def write_sbd(root, masks: dict, train, val):
    sbd = root / "benchmark_RELEASE" / "dataset"
    (sbd / "img").mkdir(parents=True)
    (sbd / "cls").mkdir()
    for n, (sample_id, labels) in enumerate(masks.items()):
        save_image(sbd / "img" / f"{sample_id}.jpg", seed=100 + n)
        save_sbd_mat(labels, sbd / "cls" / f"{sample_id}.mat")
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return sbd


def one_line_naming(error, *parts):
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, message


def test_palette_and_grayscale_png_masks_read_as_exact_class_indices(tmp_path):
    masks = {"2007_000032": label_map(1), "2007_000039": label_map(2)}
    voc = write_voc(tmp_path, masks, {"train": list(masks)})
    save_png_mask(masks["2007_000039"], voc / "SegmentationClass" / "2007_000039.png", mode="L")  # also accepted
    root = find_voc(tmp_path)
    assert root.voc_dir == voc and root.sbd_dir is None and root.class_names == VOC_CLASSES
    ds = SegmentationDataset(segmentation_samples(root, "train"), root.class_names)
    assert ds.num_classes == 21 and len(ds) == 2
    for i, labels in enumerate(masks.values()):
        image, mask = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, H, W)
        assert mask.dtype == torch.int64 and mask.shape == (H, W)
        assert torch.equal(mask, torch.from_numpy(labels).long())  # indices, not palette colours; 255 kept
        assert ds.original_size(i) == (H, W)
    assert (masks["2007_000032"] == 255).any()


def test_sbd_mat_in_sbd_structure_reads_the_segmentation_field(tmp_path):
    labels = label_map(3, values=(0, 7, 20), void=False)
    path = tmp_path / "2008_000002.mat"
    save_sbd_mat(labels, path)
    assert scipy.io.whosmat(path) == [("GTcls", (1, 1), "struct")]  # what SBD's files hold
    mask = read_mask(path, "mat")
    assert mask.dtype == np.uint8 and np.array_equal(mask, labels)


def test_train_aug_is_voc_train_plus_sbd_minus_voc_val_with_voc_masks_preferred(tmp_path):
    voc_masks = {i: label_map(n) for n, i in enumerate(["a1", "a2", "b1", "v1", "v2"])}
    write_voc(tmp_path, voc_masks, {"train": ["a1", "a2", "b1"], "val": ["v1", "v2"],
                                    "trainval": ["a1", "a2", "b1", "v1", "v2"]})
    # SBD annotates b1 too (differently, without void), and two VOC val images, which train_aug must leave out.
    sbd_masks = {i: label_map(10 + n, values=(0, 3), void=False) for n, i in enumerate(["b1", "v1", "v2", "s1", "s2",
                                                                                        "s3"])}
    write_sbd(tmp_path, sbd_masks, train=["b1", "v1", "s1", "s2"], val=["s2", "v2", "s3"])
    root = find_voc(tmp_path)
    assert root.sbd_dir == tmp_path / "benchmark_RELEASE" / "dataset"
    assert find_voc(tmp_path, sbd=tmp_path / "benchmark_RELEASE").sbd_dir == root.sbd_dir  # SBD given elsewhere
    with pytest.raises(UserError) as e:
        find_voc(tmp_path, sbd=tmp_path / "VOCdevkit")
    one_line_naming(e.value, tmp_path / "VOCdevkit", "cls/")

    samples = segmentation_samples(root, "train_aug")
    assert [s.id for s in samples] == ["a1", "a2", "b1", "s1", "s2", "s3"]  # s2 once; v1, v2 excluded
    kinds = {s.id: s.mask_kind for s in samples}
    assert kinds == {"a1": "png", "a2": "png", "b1": "png", "s1": "mat", "s2": "mat", "s3": "mat"}
    ds = SegmentationDataset(samples, root.class_names)
    by_id = {s.id: ds[n][1] for n, s in enumerate(samples)}
    assert torch.equal(by_id["b1"], torch.from_numpy(voc_masks["b1"]).long())  # VOC's own mask, not SBD's
    assert torch.equal(by_id["s3"], torch.from_numpy(sbd_masks["s3"]).long())
    assert len(segmentation_samples(root, "trainval")) == 5 and len(segmentation_samples(root, "val")) == 2


def test_train_aug_without_sbd_says_what_is_missing(tmp_path):
    write_voc(tmp_path, {"a": label_map(0)}, {"train": ["a"], "val": ["a"]})
    with pytest.raises(UserError) as e:
        segmentation_samples(find_voc(tmp_path), "train_aug")
    one_line_naming(e.value, "train_aug", tmp_path / "benchmark_RELEASE" / "dataset", "cls/", "train.txt")
    with pytest.raises(UserError) as e:
        segmentation_samples(find_voc(tmp_path), "test")
    one_line_naming(e.value, "'test'", "train_aug")


def test_layouts_and_labels_txt(tmp_path):
    flat = write_voc(tmp_path / "flat", {"a": label_map(0)}, {"train": ["a"]}, devkit=False)
    assert find_voc(flat).voc_dir == flat
    (flat / "labels.txt").write_text("background\ncat\ndog\n")
    assert find_voc(flat).class_names == ("background", "cat", "dog")
    (flat / "labels.txt").write_text("background\ncat\ncat\n")
    with pytest.raises(UserError) as e:
        find_voc(flat)
    one_line_naming(e.value, flat / "labels.txt", "distinct")

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        find_voc(tmp_path / "empty")
    one_line_naming(e.value, tmp_path / "empty", "VOCdevkit/VOC2012/JPEGImages", "JPEGImages")
    with pytest.raises(UserError) as e:
        find_voc(tmp_path / "nowhere")
    one_line_naming(e.value, tmp_path / "nowhere")


def test_missing_list_file_and_missing_files_name_the_list_and_the_path(tmp_path):
    voc = write_voc(tmp_path, {"a": label_map(0), "b": label_map(1), "c": label_map(2)}, {"train": ["a", "b", "c"]})
    root = find_voc(tmp_path)
    with pytest.raises(UserError) as e:
        segmentation_samples(root, "val")
    one_line_naming(e.value, voc / "ImageSets" / "Segmentation" / "val.txt", "no such list file")

    (voc / "SegmentationClass" / "b.png").unlink()
    (voc / "JPEGImages" / "c.jpg").unlink()
    with pytest.raises(UserError) as e:
        segmentation_samples(root, "train")
    one_line_naming(e.value, voc / "ImageSets" / "Segmentation" / "train.txt", voc / "SegmentationClass" / "b.png",
                    "2 missing files")


def _truncated_png(path):
    save_png_mask(label_map(0), path)
    path.write_bytes(path.read_bytes()[:60])


def _truncated_mat(path):
    save_sbd_mat(label_map(0, void=False), path)
    path.write_bytes(path.read_bytes()[:200])


# name: (mask kind, writes the bad mask at a path, what the message must say besides the path)
BAD_MASKS = {
    "wrong size": ("png", lambda p: save_png_mask(np.zeros((H, W + 1), np.uint8), p), f"{W + 1}x{H}"),
    "value 21": ("png", lambda p: save_png_mask(np.full((H, W), 21, np.uint8), p), "21"),
    "rgb colour mask": ("png", lambda p: Image.new("RGB", (W, H), (128, 0, 0)).save(p), "RGB"),
    "truncated png": ("png", _truncated_png, "unreadable mask"),
    "corrupt mat": ("mat", _truncated_mat, "unreadable .mat"),
    "mat without GTcls": ("mat", lambda p: scipy.io.savemat(p, {"GTinst": {"Segmentation": np.zeros((H, W))}}),
                          "GTcls"),
    "mat value 40": ("mat", lambda p: save_sbd_mat(np.full((H, W), 40, np.uint8), p), "40"),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_every_bad_mask_is_one_line_naming_the_file(tmp_path, case):
    kind, write, words = BAD_MASKS[case]
    save_image(tmp_path / "x.jpg")
    mask_path = tmp_path / f"x.{kind}"
    write(mask_path)
    sample = SegSample("x", tmp_path / "x.jpg", mask_path, kind)
    ds = SegmentationDataset([sample], VOC_CLASSES, on_bad_image="skip")  # a bad mask is never skipped
    with pytest.raises(SegmentationDataError) as e:
        ds[0]
    one_line_naming(e.value, mask_path, words)


def first_error(loader):
    """The error of the first batch, without its traceback: a frame left holding the loader would keep its worker
    alive until a garbage collection, whose worker shutdown stalls 5 s (see `loader.ClassificationLoader`)."""
    try:
        next(iter(loader))
    except UserError as e:
        e.__traceback__ = None
        return e
    raise AssertionError("no error raised")


def test_errors_from_a_dataloader_worker_stay_one_line(tmp_path):
    voc = write_voc(tmp_path, {"a": label_map(0), "b": label_map(1)}, {"train": ["a", "b"]})
    save_png_mask(np.full((H, W), 30, np.uint8), voc / "SegmentationClass" / "a.png")
    samples = segmentation_samples(find_voc(tmp_path), "train")
    error = first_error(torch.utils.data.DataLoader(SegmentationDataset(samples, VOC_CLASSES), num_workers=1))
    assert isinstance(error, SegmentationDataError)
    one_line_naming(error, voc / "SegmentationClass" / "a.png", "30")

    save_png_mask(label_map(0), voc / "SegmentationClass" / "a.png")
    (voc / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    error = first_error(torch.utils.data.DataLoader(SegmentationDataset(samples, VOC_CLASSES), num_workers=1))
    assert isinstance(error, BadImageError)
    one_line_naming(error, voc / "JPEGImages" / "a.jpg")


def test_unreadable_image_is_skipped_and_reported(tmp_path):
    masks = {"a": label_map(0), "b": label_map(1), "c": label_map(2)}
    voc = write_voc(tmp_path, masks, {"train": list(masks)})
    bad = voc / "JPEGImages" / "a.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    samples = segmentation_samples(find_voc(tmp_path), "train")
    with pytest.raises(BadImageError) as e:
        SegmentationDataset(samples, VOC_CLASSES)[0]
    one_line_naming(e.value, bad)
    ds = SegmentationDataset(samples, VOC_CLASSES, on_bad_image="skip")
    assert torch.equal(ds[0][1], torch.from_numpy(masks["b"]).long())  # replaced by the next readable sample
    assert torch.equal(ds[2][1], torch.from_numpy(masks["c"]).long())
    report = ds.bad_images()
    assert report.count == 1 and report.examples[0][0] == str(bad)
    assert SegmentationDataset(samples, VOC_CLASSES, on_bad_image="skip").bad_images().count == 0


def test_folder_pairs_by_stem_with_or_without_a_list(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "ann"
    images.mkdir()
    masks.mkdir()
    for n, stem in enumerate(["p", "q", "r"]):
        save_image(images / f"{stem}.{'png' if n == 1 else 'jpg'}")
    for stem in ("p", "q"):  # r is unlabelled: left out
        save_png_mask(label_map(0), masks / f"{stem}.png")
    samples = folder_samples(images, masks)
    assert [(s.id, s.image_path.name, s.mask_path.name) for s in samples] == [("p", "p.jpg", "p.png"),
                                                                              ("q", "q.png", "q.png")]
    (tmp_path / "list.txt").write_text("q\n")
    assert [s.id for s in folder_samples(images, masks, tmp_path / "list.txt")] == ["q"]
    (tmp_path / "list.txt").write_text("q\nr\n")
    with pytest.raises(UserError) as e:
        folder_samples(images, masks, tmp_path / "list.txt")
    one_line_naming(e.value, tmp_path / "list.txt", masks / "r.png", "1 missing")
    save_png_mask(label_map(0), masks / "s.png")
    with pytest.raises(UserError) as e:
        folder_samples(images, masks)
    one_line_naming(e.value, masks / "s.png", "1 of the 3 masks")


def test_mask_drawn_on_stored_pixels_of_a_rotated_photo_gets_that_frame(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored W x H, shown upright as H x W
    stored = np.zeros((H, W, 3), np.uint8)
    stored[:, : W // 2] = 255  # left half white in the stored pixels
    Image.fromarray(stored).save(tmp_path / "img" / "x.png", exif=exif)
    labels = np.zeros((H, W), np.uint8)
    labels[:, : W // 2] = 1
    save_png_mask(labels, tmp_path / "ann" / "x.png")
    image, mask = SegmentationDataset(folder_samples(tmp_path / "img", tmp_path / "ann"), VOC_CLASSES)[0]
    assert image.shape == (3, H, W) and torch.equal(image[0] == 255, mask == 1)


def test_embedded_shapes_read_with_their_labels_txt(tmp_path):
    root = find_voc(write_dataset(tmp_path, "segment", images=8, size=64))
    assert root.class_names == ("background", *SHAPE_CLASSES)
    samples = segmentation_samples(root, "train") + segmentation_samples(root, "val")
    ds = SegmentationDataset(samples, root.class_names)
    assert len(ds) == 8
    seen = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
        seen |= set(mask.unique().tolist())
    assert {0, 255} <= seen <= set(range(len(root.class_names))) | {255}
