"""COCO-format detection data: layouts found, labels mapped, boxes normalised, every bad input one line naming the
file (and the annotation id), unreadable images skipped or raised."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mnv2.data import BadImageError, CocoDetection, detection_eval_preset, find_coco_split, write_dataset
from mnv2.errors import UserError

CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


def write_coco(folder, annotations, images=((1, 200, 100),), categories=CATEGORIES, name="instances.json"):
    """Black PNGs `<id>.png` of (id, width, height) in `folder/images` and a COCO file of `annotations`, given as
    (annotation id, image id, category id, bbox[, iscrowd])."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image_id, w, h in images:
        Image.new("RGB", (w, h)).save(folder / "images" / f"{image_id}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
            "annotations": [{"id": a[0], "image_id": a[1], "category_id": a[2], "bbox": a[3],
                             "iscrowd": a[4] if len(a) > 4 else 0, "area": 1.0} for a in annotations],
            "categories": list(categories)}
    path = folder / name
    path.write_text(json.dumps(data))
    return folder / "images", path


def one_line_naming(error, *parts):
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, message


def test_coco2017_and_shapes_layouts_are_found_and_explicit_paths_win(tmp_path):
    coco = tmp_path / "coco"
    (coco / "val2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_val2017.json").write_text("{}")
    assert find_coco_split(coco, "val") == (coco / "val2017", coco / "annotations" / "instances_val2017.json")

    shapes = write_dataset(tmp_path / "shapes", "detect", images=10, size=64)
    images, ann = find_coco_split(shapes, "train")
    assert (images, ann) == (shapes / "images", shapes / "annotations" / "instances_train.json")
    train = CocoDetection(images, ann)
    val = CocoDetection(*find_coco_split(shapes, "val"), category_ids=train)
    assert len(train) + len(val) == 10 and not set(train.image_ids) & set(val.image_ids)
    assert train.category_ids == (1, 2, 3, 5, 7, 8, 10, 13)  # the shapes set's gaps, kept as given

    other_images, other_ann = write_coco(tmp_path / "other", [])
    assert find_coco_split(coco, "val", images=other_images, annotations=other_ann) == (other_images, other_ann)
    assert find_coco_split(None, "val", images=other_images, annotations=other_ann) == (other_images, other_ann)
    assert find_coco_split(coco, "val", annotations=other_ann) == (coco / "val2017", other_ann)

    with pytest.raises(UserError) as e:
        find_coco_split(coco, "train")
    one_line_naming(e.value, coco / "train2017", coco / "annotations" / "instances_train2017.json",
                    coco / "images", coco / "annotations" / "instances_train.json")


def test_category_id_gaps_map_to_contiguous_labels_and_back(tmp_path):
    anns = [(11, 1, 90, [0, 0, 10, 10]), (12, 1, 1, [0, 0, 10, 10]), (13, 1, 5, [0, 0, 10, 10])]
    ds = CocoDetection(*write_coco(tmp_path, anns))
    assert ds.category_ids == (1, 5, 90) and ds.class_names == ("person", "airplane", "toothbrush")
    _, target = ds[0]
    assert target["labels"].tolist() == [3, 1, 2]
    file_ids = [ds.coco.anns[a]["category_id"] for a in (11, 12, 13)]
    assert [ds.category_ids[label - 1] for label in target["labels"].tolist()] == file_ids
    assert target["labels"].dtype == torch.int64 and target["image_id"] == 1


def test_val_reuses_the_train_mapping(tmp_path):
    train = CocoDetection(*write_coco(tmp_path / "train", [(1, 1, 1, [0, 0, 5, 5])]))
    val_files = write_coco(tmp_path / "val", [(7, 1, 90, [0, 0, 5, 5])], categories=[CATEGORIES[0]])
    assert CocoDetection(*val_files).category_ids == (90,)  # alone, its one category would be label 1
    # A list of ids (e.g. from a checkpoint) names only the categories this file lists; a dataset gives all names.
    for mapping, names in ((train, train.class_names), (train.category_ids, ("1", "5", "toothbrush"))):
        val = CocoDetection(*val_files, category_ids=mapping)
        assert val.category_ids == train.category_ids and val.class_names == names
        assert val[0][1]["labels"].tolist() == [3]

    extra = write_coco(tmp_path / "extra", [], categories=[*CATEGORIES, {"id": 7, "name": "train"}])
    with pytest.raises(UserError, match=r"\[7\] \(train\)") as e:
        CocoDetection(*extra, category_ids=train)
    one_line_naming(e.value, extra[1], train.annotation_file)
    with pytest.raises(UserError) as e:
        CocoDetection(*extra, category_ids=[1, 5, 90])
    one_line_naming(e.value, extra[1])


def test_image_without_boxes_gives_empty_targets(tmp_path):
    files = write_coco(tmp_path, [(1, 2, 1, [0, 0, 10, 10])], images=[(1, 40, 30), (2, 40, 30)])
    for transform in (None, detection_eval_preset(32)):
        ds = CocoDetection(*files, transform=transform)
        assert ds.image_ids == [1, 2]  # kept, although it has no annotation
        _, target = ds[0]
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["iscrowd"].shape == (0,)
        assert target["orig_size"] == (30, 40)


def test_non_square_image_boxes_are_normalised_by_width_and_height(tmp_path):
    anns = [(1, 1, 1, [20, 10, 50, 40]), (2, 1, 5, [180, 90, 40, 20], 1)]  # the second runs off the corner: clipped
    files = write_coco(tmp_path, anns, images=[(1, 200, 100)])
    expected = torch.tensor([[0.1, 0.1, 0.35, 0.5], [0.9, 0.9, 1.0, 1.0]])
    image, target = CocoDetection(*files)[0]
    assert image.shape == (3, 100, 200) and image.dtype == torch.uint8
    assert torch.allclose(target["boxes"], expected)
    assert target["orig_size"] == (100, 200) and target["iscrowd"].tolist() == [False, True]
    image, target = CocoDetection(*files, transform=detection_eval_preset(64))[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert torch.allclose(target["boxes"], expected, atol=1e-6)  # a squashing resize keeps normalised boxes


def test_zero_size_and_outside_boxes_are_dropped_and_counted(tmp_path):
    anns = [(918, 1, 1, [10, 10, 30, 0]),  # zero height, as annotations 918 and 2206849 of train2017
            (2, 1, 1, [10, 10, 0, 5]), (3, 1, 1, [250, 10, 20, 20]),  # zero width; right of a 200-wide image
            (4, 1, 5, [10, 10, 30, 20])]
    ds = CocoDetection(*write_coco(tmp_path, anns))
    assert ds.degenerate == 3
    _, target = ds[0]
    assert target["labels"].tolist() == [2] and torch.allclose(target["boxes"], torch.tensor([[.05, .1, .2, .3]]))


BAD_ANNOTATIONS = [
    ({"image_id": 9}, "image_id 9"),
    ({"bbox": [1, 2, 3]}, "not 4 finite numbers"),
    ({"bbox": [1, 2, "3", 4]}, "not 4 finite numbers"),
    ({"bbox": [1, 2, float("nan"), 4]}, "not 4 finite numbers"),
    ({"bbox": [1, 2, 3, -4]}, "negative"),
    ({"category_id": 3}, "category_id 3"),
]


@pytest.mark.parametrize("change, says", BAD_ANNOTATIONS)
def test_bad_annotation_is_one_line_naming_file_and_annotation_id(tmp_path, change, says):
    files = write_coco(tmp_path, [(1, 1, 1, [0, 0, 5, 5]), (417, 1, 1, [0, 0, 5, 5])])
    data = json.loads(files[1].read_text())
    data["annotations"][1].update(change)
    files[1].write_text(json.dumps(data))
    with pytest.raises(UserError, match=says) as e:
        CocoDetection(*files)
    one_line_naming(e.value, files[1], "annotation 417")


@pytest.mark.parametrize("corrupt, says", [
    (lambda text, data: text[:-5], "not a readable JSON"),
    (lambda text, data: json.dumps({k: v for k, v in data.items() if k != "annotations"}), "'annotations'"),
    (lambda text, data: json.dumps([data]), "not a COCO detection file"),
    (lambda text, data: json.dumps({**data, "images": data["images"] * 2}), "image id 1 appears twice"),
])
def test_bad_file_is_one_line_naming_it(tmp_path, corrupt, says):
    files = write_coco(tmp_path, [(1, 1, 1, [0, 0, 5, 5])])
    text = files[1].read_text()
    files[1].write_text(corrupt(text, json.loads(text)))
    with pytest.raises(UserError, match=says) as e:
        CocoDetection(*files)
    one_line_naming(e.value, files[1])


def test_unreadable_image_raises_or_is_skipped_and_reported(tmp_path):
    images, ann = write_coco(tmp_path, [(1, 2, 1, [0, 0, 5, 5])], images=[(1, 20, 10), (2, 20, 10), (3, 20, 10)])
    bad = images / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(BadImageError) as e:
        CocoDetection(images, ann)[0]
    one_line_naming(e.value, bad)
    ds = CocoDetection(images, ann, on_bad_image="skip")
    assert ds[0][1]["image_id"] == 2 and ds[1][1]["image_id"] == 2  # replaced by the next readable image
    (images / "3.png").unlink()
    assert ds[2][1]["image_id"] == 2  # wraps around past the missing file
    report = ds.bad_images()
    assert report.count == 2 and {p for p, _ in report.examples} == {str(bad), str(images / "3.png")}
    assert CocoDetection(images, ann, on_bad_image="skip").bad_images().count == 0


def test_exif_orientation_follows_the_frame_of_the_annotation_file(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 20, shown upright as 20 x 40
    files = write_coco(tmp_path, [], images=[(1, 40, 20)])
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the stored image's left
    Image.fromarray(pixels).save(files[0] / "1.png", exif=exif.tobytes())
    stored, _ = CocoDetection(*files)[0]  # the JSON says 40 x 20: COCO's convention, the stored pixels
    assert stored.shape == (3, 20, 40) and stored[:, :, :10].min() == 255 and stored[:, :, 10:].max() == 0
    data = json.loads(files[1].read_text())
    data["images"][0].update(width=20, height=40)
    files[1].write_text(json.dumps(data))
    upright, _ = CocoDetection(*files)[0]  # the JSON says 20 x 40: the annotator saw the upright photo
    assert upright.shape == (3, 40, 20) and upright[:, :10].min() == 255 and upright[:, 10:].max() == 0
    data["images"][0].update(width=30, height=30)
    files[1].write_text(json.dumps(data))
    with pytest.raises(BadImageError, match="decoded size 20x40 is not the 30x30") as e:
        CocoDetection(*files)[0]
    one_line_naming(e.value, files[0] / "1.png", files[1])
