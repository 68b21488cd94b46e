"""The embedded shapes dataset: deterministic bytes, and every layout read by the field's own readers."""

import hashlib
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from mnv2.data import ImageFolderDataset, ensure_demo_dataset, shapes, synthetic, write_dataset
from mnv2.errors import UserError

K = len(shapes.CLASSES)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, "classify", images=48, size=40, seed=3)
    write_dataset(out, "detect", images=20, size=96, seed=3)
    write_dataset(out, "segment", images=15, size=80, seed=3)
    return out


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path, shapes_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, "all", images=20, size=32, seed=7)
    write_dataset(b, "all", images=20, size=32, seed=7)
    da, db = digest(a), digest(b)
    assert len(da) > 60 and da == db
    write_dataset(b, "all", images=20, size=32, seed=8)  # replaces the folders in place
    dc = digest(b)
    images_a = {k: v for k, v in da.items() if k.endswith(".jpg")}
    images_c = {k: v for k, v in dc.items() if k.endswith(".jpg")}
    assert images_a.keys() & images_c.keys()
    assert all(images_a[k] != images_c[k] for k in images_a.keys() & images_c.keys())


def test_imagefolder_layout_agrees_with_torchvision(shapes_dir):
    for split in ("train", "val"):
        ours = ImageFolderDataset(shapes_dir / "classify", split)
        theirs = torchvision.datasets.ImageFolder(str(shapes_dir / "classify" / split))
        assert ours.classes == theirs.classes == sorted(shapes.CLASSES)
        assert [(str(p), t) for p, t in ours.samples] == [(str(p), t) for p, t in theirs.samples]
        assert set(ours.targets) == set(range(K))  # every class in both splits
    n_train = len(ImageFolderDataset(shapes_dir / "classify", "train"))
    n_val = len(ImageFolderDataset(shapes_dir / "classify", "val"))
    assert n_train + n_val == 48 and 0.15 <= n_val / 48 <= 0.3
    image, label = ImageFolderDataset(shapes_dir / "classify", "val")[0]
    assert image.shape == (3, 40, 40) and 0 <= label < K


def test_classification_label_is_the_dominant_shape():
    for i in range(20):
        label = i % K
        scene = shapes.classification_scene(np.random.default_rng(i), 64, label)
        areas = [(scene.owner == k).sum() for k in range(len(scene.shapes))]
        main = int(np.argmax(areas))
        assert scene.shapes[main].kind == label
        assert all(a < areas[main] / 2 for k, a in enumerate(areas) if k != main)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs NumPy 2
def test_coco_layout_loads_with_pycocotools(shapes_dir):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    root = shapes_dir / "detect"
    ids, n_images, n_anns = set(), 0, 0
    for split in ("train", "val"):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        cat_ids = sorted(coco.getCatIds())
        assert len(cat_ids) == K and cat_ids != list(range(1, K + 1))  # gaps, as in COCO
        assert [c["name"] for c in coco.loadCats(cat_ids)] == list(shapes.CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            n_images += 1
            ids.add(img["id"])
            with Image.open(root / "images" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                n_anns += 1
                x, y, w, h = ann["bbox"]
                assert 0 <= x and 0 <= y and w > 0 and h > 0
                assert x + w <= img["width"] and y + h <= img["height"]
                assert ann["iscrowd"] == 0 and ann["category_id"] in cat_ids
                m = coco.annToMask(ann)  # the RLE decodes to the visible mask: its area and box agree
                assert m.sum() == ann["area"]
                assert mask_utils.toBbox(coco.annToRLE(ann)).tolist() == ann["bbox"]
    assert n_images == 20 and len(ids) == 20
    assert n_anns / n_images > 1.5  # several objects per image


def test_voc_layout_masks(shapes_dir):
    root = shapes_dir / "segment"
    names = {s: (root / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    assert names["train"] and names["val"] and not set(names["train"]) & set(names["val"])
    seen = set()
    for name in names["train"] + names["val"]:
        with Image.open(root / "JPEGImages" / f"{name}.jpg") as im, \
                Image.open(root / "SegmentationClass" / f"{name}.png") as mask:
            assert mask.mode == "P" and mask.size == im.size
            palette = mask.getpalette()
            values = np.asarray(mask)
        seen |= set(np.unique(values).tolist())
    assert seen <= set(range(K + 1)) | {255}
    assert {0, 255} <= seen and len(seen & set(range(1, K + 1))) >= 3
    # PASCAL VOC's colour map: background black, aeroplane (1) dark red, bicycle (2) dark green, 255 = (224, 224, 192).
    assert palette[0:3] == [0, 0, 0] and palette[3:6] == [128, 0, 0] and palette[6:9] == [0, 128, 0]
    assert palette[255 * 3: 256 * 3] == [224, 224, 192]


def test_voc_void_separates_objects_from_background():
    scene = shapes.multi_object_scene(np.random.default_rng(5), 64, 4, (0.15, 0.3))
    labels = synthetic._label_map(scene)
    # No class pixel touches a background pixel or another class directly: a 255 pixel is always between.
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        touching = (a != b) & (a != 255) & (b != 255)
        assert not touching.any()


def test_ensure_demo_dataset_writes_once_and_redoes_an_incomplete_one(tmp_path, monkeypatch):
    monkeypatch.setitem(synthetic.DEMO, "classify", {"images": 24, "size": 32, "seed": 0})
    root = ensure_demo_dataset(tmp_path)
    assert root == tmp_path / "classify" and (root / synthetic.MARKER).is_file()
    marker_time = (root / synthetic.MARKER).stat().st_mtime_ns
    assert ensure_demo_dataset(tmp_path) == root
    assert (root / synthetic.MARKER).stat().st_mtime_ns == marker_time  # not rewritten
    (root / synthetic.MARKER).unlink()  # as if the write had been interrupted
    victim = next(root.rglob("*.jpg"))
    victim.write_bytes(b"half")
    ensure_demo_dataset(tmp_path)
    assert (root / synthetic.MARKER).is_file() and victim.read_bytes() != b"half"
    assert json.loads((root / synthetic.MARKER).read_text())["images"] == 24
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_failed_write_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    write_dataset(tmp_path, "classify", images=16, size=32, seed=1)
    before = digest(tmp_path / "classify")

    def broken(root, images, size, seed):
        (root / "train").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setitem(synthetic._WRITERS, "classify", broken)
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path, "classify", images=16, size=32, seed=2)
    assert digest(tmp_path / "classify") == before
    assert [p.name for p in tmp_path.iterdir()] == ["classify"]


def test_dataset_modes_follow_the_umask(tmp_path, umask_027):
    """The task folder is built in a private temporary folder and renamed into place: it must end up with the mode a
    plain mkdir gives (0750 under umask 027), not the temporary folder's 0700."""
    root = write_dataset(tmp_path, "segment", images=5, size=32)
    paths = [root, *root.rglob("*")]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in paths if p.is_dir()} == {oct(0o750)}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in paths if p.is_file()} == {oct(0o640)}


def test_bad_arguments_are_user_errors_and_write_nothing(tmp_path):
    for kwargs in ({"task": "pose"}, {"task": "all", "images": 6}, {"task": "classify", "size": 8}):
        with pytest.raises(UserError):
            write_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
