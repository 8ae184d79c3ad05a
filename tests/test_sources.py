"""Detection sources: COCO json and Ultralytics YOLO txt, and their COCO ground truth (data.sources)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.sources import label_path, load_coco_json, load_yolo_dataset


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 90, np.uint8))
    return path


def write_coco(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    write_image(images / "a.jpg", 64, 48)
    write_image(images / "b.jpg", 32, 32)
    coco = {
        # categories out of order and with gaps: model class i = i-th sorted id
        "categories": [{"id": 7, "name": "cat"}, {"id": 2, "name": "bird"}, {"id": 90, "name": "toaster"}],
        "images": [{"id": 11, "file_name": "a.jpg", "width": 64, "height": 48},
                   {"id": 12, "file_name": "b.jpg", "width": 32, "height": 32}],
        "annotations": [   # with segmentations as COCO writes them: a polygon, and RLE for a crowd
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [1, 2, 10, 20], "area": 150.5, "iscrowd": 0,
             "segmentation": [[1.0, 2.0, 11.0, 2.0, 11.0, 22.0, 1.0, 22.0]]},
            {"id": 2, "image_id": 11, "category_id": 90, "bbox": [5, 5, 4, 4], "area": 16, "iscrowd": 1,
             "segmentation": {"counts": [245, 4, 44, 4, 44, 4, 44, 4, 2687], "size": [48, 64]}},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_json_maps_sorted_category_ids_to_classes(tmp_path):
    src = load_coco_json(tmp_path / "images", write_coco(tmp_path))
    assert src.class_names == ["bird", "cat", "toaster"]
    assert src.category_ids == [2, 7, 90]
    a, b = src.records
    assert (a.image_id, a.width, a.height, a.path.name) == (11, 64, 48, "a.jpg")
    np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 22], [5, 5, 9, 9]])
    np.testing.assert_array_equal(a.classes, [1, 2])
    np.testing.assert_array_equal(a.iscrowd, [False, True])
    assert a.boxes.dtype == np.float32 and a.classes.dtype == np.int64
    assert b.boxes.shape == (0, 4) and b.classes.shape == (0,)


def test_coco_json_round_trips_through_to_coco(tmp_path):
    src = load_coco_json(tmp_path / "images", write_coco(tmp_path))
    gt = src.to_coco()
    assert [c["id"] for c in gt["categories"]] == [2, 7, 90]
    assert [(i["id"], i["width"], i["height"]) for i in gt["images"]] == [(11, 64, 48), (12, 32, 32)]
    anns = gt["annotations"]
    assert [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in anns] == [
        (7, [1.0, 2.0, 10.0, 20.0], 150.5, 0), (90, [5.0, 5.0, 4.0, 4.0], 16.0, 1)]
    assert all(a["id"] > 0 for a in anns) and len({a["id"] for a in anns}) == len(anns)


def test_coco_boxes_past_their_image_are_clipped_as_detections_are_and_scored_alike(tmp_path):
    """Found by a review: a json box hanging off its image was kept, while detections (and the same
    box read from YOLO txt) are clipped, so even a perfect detection scored mAP50-95 0.4."""
    from detector.evaluate import coco_metrics

    images = tmp_path / "images"
    write_image(images / "a.jpg", 64, 48)
    coco = {"categories": [{"id": 1, "name": "a"}],
            "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 10, 40, 20], "area": 800},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 2.5, 20, 45.8]}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match=r"a.json: annotations whose box reaches more than 1 px outside its image: 1; "
                                         r"they were clipped to the image"):
        source = load_coco_json(images, tmp_path / "a.json")
    (record,) = source.records
    np.testing.assert_allclose(record.boxes, [[40, 10, 64, 30], [2, 2.5, 22, 48]])      # 48.3 -> 48 silently
    np.testing.assert_allclose(record.areas, [800, 20 * 45.5])      # a given area is kept, else the clipped box's
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": 0.9} for x1, y1, x2, y2 in record.boxes]
    assert coco_metrics(source.to_coco(), perfect).map50_95 == pytest.approx(1.0)
    coco["annotations"].append({"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 0], "iscrowd": 0})
    (tmp_path / "a.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning):
        (record,) = load_coco_json(images, tmp_path / "a.json").records
    assert len(record.boxes) == 3                      # no area: kept, as pycocotools counts it


def test_coco_json_unknown_category_names_file_and_annotation(tmp_path):
    path = write_coco(tmp_path)
    coco = json.loads(path.read_text())
    coco["annotations"][1]["category_id"] = 5
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"instances\.json: annotation id 2: category_id 5"):
        load_coco_json(tmp_path / "images", path)


def _break(coco: dict, defect: str) -> None:
    if defect == "image without file_name":
        del coco["images"][0]["file_name"]
    elif defect == "image width as a fraction":
        coco["images"][1]["width"] = 32.5
    elif defect == "image height zero":
        coco["images"][1]["height"] = 0
    elif defect == "annotation without image_id":
        del coco["annotations"][0]["image_id"]
    elif defect == "category id as text":
        coco["categories"][0]["id"] = "x"
    elif defect == "bbox with text":
        coco["annotations"][0]["bbox"] = [1, 2, "x", 4]
    elif defect == "bbox with negative size":
        coco["annotations"][0]["bbox"] = [10, 10, -5, -5]
    elif defect == "image id twice":
        coco["images"][1]["id"] = 11
    elif defect == "category id twice":          # found by a review: both classes were scored as category 7
        coco["categories"][2]["id"] = 7


@pytest.mark.parametrize("defect, message", [
    ("image without file_name", r"image 11: expected 'file_name' \(text\), found None"),
    ("image width as a fraction", r"image 12: expected 'width' \(a whole number\), found 32.5"),
    ("image height zero", r"image 12: expected a positive width and height, found 32x0"),
    ("annotation without image_id", r"annotation 1: expected 'image_id' \(a whole number\), found None"),
    ("category id as text", r"category 'x': expected 'id' \(a whole number\), found 'x'"),
    ("bbox with text", r"annotation id 1: expected 'bbox' \[x, y, w, h\] of numbers with w, h >= 0, found \[1, 2, 'x', 4\]"),
    ("bbox with negative size", r"annotation id 1: expected 'bbox' .* found \[10, 10, -5, -5\]"),
    ("image id twice", r"image id 11 is listed twice in 'images'"),
    ("category id twice", r"category id 7 is listed twice in 'categories' \('cat' and 'toaster'\)"),
])
def test_coco_json_bad_entries_name_the_file_and_the_entry(tmp_path, defect, message):
    path = write_coco(tmp_path)
    coco = json.loads(path.read_text())
    _break(coco, defect)
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"instances\.json: " + message):
        load_coco_json(tmp_path / "images", path)


def test_a_category_listed_twice_alike_is_one(tmp_path):
    """A review: the same entry twice (id and name) is harmless, and pycocotools keeps one."""
    path = write_coco(tmp_path)
    coco = json.loads(path.read_text())
    coco["categories"].append(dict(coco["categories"][0]))
    path.write_text(json.dumps(coco))
    assert load_coco_json(tmp_path / "images", path).class_names == ["bird", "cat", "toaster"]


def test_coco_json_whole_numbers_may_be_written_as_floats_or_text(tmp_path):
    path = write_coco(tmp_path)
    coco = json.loads(path.read_text())
    coco["images"][0].update(width=64.0, height="48", id="11")
    coco["annotations"][0]["image_id"] = 11.0
    path.write_text(json.dumps(coco))
    first = load_coco_json(tmp_path / "images", path).records[0]
    assert (first.image_id, first.width, first.height, len(first.boxes)) == (11, 64, 48, 2)


def test_coco_json_missing_image_is_file_not_found(tmp_path):
    path = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothere.json: COCO annotations json not found"):
        load_coco_json(tmp_path / "images", tmp_path / "nothere.json")
    (tmp_path / "images" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="b.jpg"):
        load_coco_json(tmp_path / "images", path)


def write_yolo_dataset(root: Path, names_yaml: str) -> Path:
    write_image(root / "images" / "val" / "000000000042.jpg", 100, 50)
    write_image(root / "images" / "val" / "000000000007.png", 40, 40)    # no label file: no objects
    labels = root / "labels" / "val" / "000000000042.txt"
    labels.parent.mkdir(parents=True)
    labels.write_text(
        "1 0.5 0.5 0.2 0.4\n"           # -> x 40..60, y 15..35
        "0 0.95 0.1 0.2 0.4\n"          # sticks out right and top: clipped to x 85..100, y 0..15
        "0 1.2 0.5 0.1 0.1\n"           # entirely outside: dropped
        "\n"
        "1 0.1 0.2 0.3 0.2 0.2 0.6\n")  # polygon (0.1,0.2) (0.3,0.2) (0.2,0.6): box x 10..30, y 10..30
    yaml_path = root / "cfg" / "data.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(f"path: ..\ntrain: images/train\nval: images/val\n{names_yaml}")
    return yaml_path


@pytest.mark.parametrize("names_yaml", ["names: [dog, person]\n", "names:\n  0: dog\n  1: person\n"])
def test_yolo_dataset_reads_labels_relative_to_yaml_path(tmp_path, names_yaml):
    with pytest.warns(UserWarning, match=r"1 of 4 label lines has coordinates outside \[0, 1\].*042.txt:3"):
        src = load_yolo_dataset(write_yolo_dataset(tmp_path / "ds", names_yaml), split="val")
    assert src.class_names == ["dog", "person"] and src.category_ids == [1, 2]
    empty, labelled = src.records  # sorted by path: ...007.png before ...042.jpg
    assert (empty.image_id, empty.width, empty.height, len(empty.boxes)) == (7, 40, 40, 0)
    assert (labelled.image_id, labelled.width, labelled.height) == (42, 100, 50)
    np.testing.assert_allclose(labelled.boxes, [[40, 15, 60, 35], [85, 0, 100, 15], [10, 10, 30, 30]], atol=1e-4)
    np.testing.assert_array_equal(labelled.classes, [1, 0, 1])
    assert not labelled.iscrowd.any()


def one_image_dataset(root: Path, labels: str) -> Path:
    """data.yaml of a val split of one 40x40 image whose label file holds `labels`."""
    write_image(root / "images" / "val" / "1.jpg", 40, 40)
    (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "val" / "1.txt").write_text(labels)
    (root / "data.yaml").write_text("val: images/val\nnames: [a]\n")
    return root / "data.yaml"


def test_a_split_whose_every_line_is_outside_only_by_rounding_warns_and_is_not_refused(tmp_path):
    """Found by a review: one label line at w 1.000001 made its split an error ("pixel coordinates?")."""
    with pytest.warns(UserWarning, match=r"1 of 1 label lines has coordinates outside \[0, 1\]"):
        source = load_yolo_dataset(one_image_dataset(tmp_path, "0 0.5 0.5 1.000001 0.2\n"))
    np.testing.assert_allclose(source.records[0].boxes, [[0, 16, 40, 24]], atol=1e-4)
    with pytest.raises(ValueError, match="its one label line has coordinates outside"):
        load_yolo_dataset(one_image_dataset(tmp_path, "0 0.5 0.5 1.02 0.2\n"))     # beyond rounding


def test_label_lines_of_zero_width_or_height_are_dropped_with_a_warning(tmp_path):
    """Found by a review: they were dropped silently (a ground truth fewer, in training and in mAP)."""
    data = one_image_dataset(tmp_path, "0 0.5 0.5 0.2 0.2\n0 0.3 0.3 0 0.2\n0 0.6 0.6 0.1 0\n0 0.5 0.5 1e-9 0.2\n")
    with pytest.warns(UserWarning, match=r"3 label lines have no area in the image .* were dropped; first: .*1.txt:2"):
        source = load_yolo_dataset(data)
    np.testing.assert_allclose(source.records[0].boxes, [[16, 16, 24, 24]], atol=1e-4)
    with pytest.warns(UserWarning, match=r"1 label line has no area in the image"):
        load_yolo_dataset(one_image_dataset(tmp_path, "0 0.5 0.5 0.2 0.2\n0 0.3 0.3 0 0.2\n"))


def test_yolo_dataset_to_coco_uses_box_areas(tmp_path):
    with pytest.warns(UserWarning, match="coordinates outside"):
        src = load_yolo_dataset(write_yolo_dataset(tmp_path / "ds", "names: [dog, person]\n"))
    anns = src.to_coco()["annotations"]
    assert [a["category_id"] for a in anns] == [2, 1, 2]
    assert [round(a["area"], 3) for a in anns] == [400.0, 225.0, 400.0]


def test_yolo_dataset_txt_image_list(tmp_path):
    root = tmp_path / "ds"
    yaml_path = write_yolo_dataset(root, "names: [dog, person]\n")
    (root / "val.txt").write_text("./images/val/000000000042.jpg\n")
    yaml_path.write_text("path: ..\nval: val.txt\nnames: [dog, person]\n")
    with pytest.warns(UserWarning, match="coordinates outside"):
        src = load_yolo_dataset(yaml_path)
    assert [r.image_id for r in src.records] == [42] and len(src.records[0].boxes) == 3


def test_yolo_dataset_non_numeric_stems_get_sequential_ids(tmp_path):
    write_image(tmp_path / "images" / "cat.jpg", 20, 20)
    write_image(tmp_path / "images" / "dog.jpg", 20, 20)
    (tmp_path / "data.yaml").write_text("val: images\nnames: [x]\n")
    with pytest.warns(UserWarning, match="none of its 2 images has a label file"):
        records = load_yolo_dataset(tmp_path / "data.yaml").records
    assert [r.image_id for r in records] == [1, 2]
    for name in ("cat", "dog"):
        (tmp_path / "labels" / f"{name}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "labels" / f"{name}.txt").write_text("")
    with pytest.warns(UserWarning, match=r"its 2 label file\(s\) list no object; all 2 images are used as images "
                                         r"without objects \(COCO's mAP of them is -1"):     # found by a review
        load_yolo_dataset(tmp_path / "data.yaml")


@pytest.mark.parametrize("line, message", [
    ("3 0.5 0.5 0.1 0.1", r"000000000042\.txt:1: class must be an integer in 0\.\.1, found 3"),
    ("0 0.5 0.5 0.1", r"000000000042\.txt:1: expected 'class cx cy w h'.*found 4 values"),
    ("0 a 0.5 0.1 0.1", r"000000000042\.txt:1: expected numbers"),
])
def test_yolo_dataset_bad_label_line_names_file_and_line(tmp_path, line, message):
    yaml_path = write_yolo_dataset(tmp_path / "ds", "names: [dog, person]\n")
    (tmp_path / "ds" / "labels" / "val" / "000000000042.txt").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_yolo_dataset(yaml_path)


def test_yolo_dataset_bad_yaml_errors(tmp_path):
    yaml_path = write_yolo_dataset(tmp_path / "ds", "names: [dog, person]\nnc: 3\n")
    with pytest.raises(ValueError, match="nc is 3 but 'names' has 2"):
        load_yolo_dataset(yaml_path)
    yaml_path.write_text("path: ..\nval: images/val\nnames: [dog]\n")
    with pytest.raises(ValueError, match="split 'test' not found"):
        load_yolo_dataset(yaml_path, split="test")
    yaml_path.write_text("path: ..\nval: images/nowhere\nnames: [dog]\n")
    with pytest.raises(FileNotFoundError, match="images/nowhere"):
        load_yolo_dataset(yaml_path)
    yaml_path.write_text("path: ..\nval: [images/val\nnames: [dog]\n")
    with pytest.raises(ValueError, match=r"data.yaml: not valid yaml \(while parsing a flow sequence") as error:
        load_yolo_dataset(yaml_path)
    assert "\n" not in str(error.value)             # one line, as every error of the command line
    # found by a review: these were bare TypeErrors, and an empty name became the class "None"
    for entry, found in (("[images/val, ~]", "None: expected the path .* found NoneType"),
                         ("{a: b}", r"\{'a': 'b'\}: expected the path .* found dict")):
        yaml_path.write_text(f"path: ..\nval: {entry}\nnames: [dog]\n")
        with pytest.raises(ValueError, match=f"data.yaml: split 'val': entry {found}"):
            load_yolo_dataset(yaml_path)
    # found by a review: an empty entry was the root folder, so `val: ''` validated on the training images
    for blank in ("''", "[]", "' '"):
        yaml_path.write_text(f"path: ..\ntrain: images/val\nval: {blank}\nnames: [dog]\n")
        with pytest.raises(ValueError, match=r"data.yaml: split 'val' not found; the yaml has \['train'\]"):
            load_yolo_dataset(yaml_path)
    yaml_path.write_text("path: ..\nval: ''\nvalidation: images/val\nnames: [dog, person]\n")  # a review
    with pytest.warns(UserWarning, match="coordinates outside"):      # the dataset's own line 3
        assert len(load_yolo_dataset(yaml_path).records) == 2
    yaml_path.write_text("path: ..\nval: [images/val, '']\nnames: [dog]\n")
    with pytest.raises(ValueError, match=r"data.yaml: split 'val': an empty path among its entries"):
        load_yolo_dataset(yaml_path)
    yaml_path.write_text("path: ..\nval: images/val\nnames:\n  - dog\n  -\n")
    with pytest.raises(ValueError, match="data.yaml: 'names' entry 1: expected a class name, found None"):
        load_yolo_dataset(yaml_path)
    yaml_path.write_text("path: ..\nval: images/val\nnc: 2\n")     # found by a review: Ultralytics takes nc alone
    with pytest.warns(UserWarning, match="coordinates outside"):      # the dataset's own line 3
        assert load_yolo_dataset(yaml_path).class_names == ["class_0", "class_1"]
    yaml_path.write_text("path: ..\nval: images/val\nnames: [dog, no]\n")
    with pytest.raises(ValueError, match=r"'names' entry 1: expected a class name, found False \(yaml reads"):
        load_yolo_dataset(yaml_path)


def test_a_split_listing_an_image_twice_uses_it_once_and_says_so(tmp_path):
    root = tmp_path / "ds"
    yaml_path = write_yolo_dataset(root, "names: [dog, person]\n")
    (root / "val.txt").write_text("images/val/000000000042.jpg\n" * 3 + "images/val/000000000007.png\n")
    yaml_path.write_text("path: ..\nval: val.txt\nnames: [dog, person]\n")
    with pytest.warns(UserWarning) as warned:
        src = load_yolo_dataset(yaml_path)
    assert [r.image_id for r in src.records] == [7, 42]
    assert any(f"{yaml_path}: split 'val' lists 1 image more than once" in str(w.message) for w in warned)
    yaml_path.write_text("path: ..\nval: 2017\nnames: [dog, person]\n")   # a folder named by a number
    (root / "images" / "val").rename(root / "2017")
    with pytest.warns(UserWarning, match="none of its 2 images has a label file"):     # labels/val stays behind
        assert len(load_yolo_dataset(yaml_path).records) == 2


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/x/images/val/a.jpg")) == Path("/d/images/x/labels/val/a.txt")
    assert label_path(Path("/d/flat/a.png")) == Path("/d/flat/a.txt")


def test_real_coco128_yaml_and_json_agree(shared_data):
    """coco128 train has both YOLO txt and the original COCO json: same non-crowd boxes and classes."""
    root = shared_data("coco128")
    from_yolo = load_yolo_dataset(root / "coco128.yaml", split="train")
    from_json = load_coco_json(root / "images" / "train2017", root / "annotations" / "instances_train2017.json")
    assert len(from_yolo.records) == len(from_json.records) == 128
    assert from_yolo.class_names == from_json.class_names  # yaml order == sorted COCO category ids
    json_by_id = {r.image_id: r for r in from_json.records}
    for record in from_yolo.records:
        reference = json_by_id[record.image_id]
        keep = ~reference.iscrowd
        assert (record.width, record.height) == (reference.width, reference.height)
        assert len(record.boxes) == keep.sum()
        if not len(record.boxes):
            continue
        distance = np.abs(record.boxes[:, None] - reference.boxes[keep][None]).max(-1)  # [n, n]
        match = distance.argmin(1)
        assert len(set(match)) == len(match) and distance.min(1).max() < 0.01
        np.testing.assert_array_equal(record.classes, reference.classes[keep][match])
    assert len(load_yolo_dataset(root / "coco128.yaml", split="val").records) == 128


@pytest.mark.parametrize("image_format", ["png", "webp"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_are_turned_by_their_exif_orientation_as_pil_turns_them(tmp_path, orientation, image_format):
    """Size (read by PIL) and pixels (decoded by OpenCV) of a file with each EXIF orientation equal
    what PIL's exif_transpose shows; lossless formats, so the comparison is exact."""
    from PIL import Image, ImageOps

    from data.eval_dataset import read_rgb
    from data.sources import displayed_size

    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"a.{image_format}"
    image.save(path, exif=exif, **({"lossless": True} if image_format == "webp" else {}))
    with Image.open(path) as reopened:
        expected = np.asarray(ImageOps.exif_transpose(reopened).convert("RGB"))
    width, height, tag = displayed_size(path)
    assert (height, width, tag) == (*expected.shape[:2], orientation)
    np.testing.assert_array_equal(read_rgb(path, tag), expected)
    np.testing.assert_array_equal(read_rgb(path), stored)                       # 1: as stored


def test_a_jpeg_cut_short_is_named_in_a_warning(tmp_path):
    """Found by a review: OpenCV decodes what there is of a truncated JPEG, grey below, and libjpeg
    prints "Premature end of JPEG file" without naming the file; a 10,000-image split hides it."""
    from data.eval_dataset import read_rgb

    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    encoded = cv2.imencode(".jpg", image)[1].tobytes()
    (tmp_path / "whole.jpg").write_bytes(encoded)
    (tmp_path / "trailer.jpg").write_bytes(encoded + bytes(1000))       # data after the end marker: whole
    (tmp_path / "video.jpg").write_bytes(encoded + bytes(100_000))      # as a motion photo (a review)
    (tmp_path / "cut.jpg").write_bytes(encoded[:len(encoded) // 2])
    with pytest.warns(UserWarning, match=f"{tmp_path / 'cut.jpg'}: a JPEG without its end marker") as caught:
        for name in ("whole.jpg", "trailer.jpg", "video.jpg", "cut.jpg"):
            assert read_rgb(tmp_path / name).shape == (64, 64, 3)
    assert len(caught) == 1


def test_yolo_labels_are_of_the_image_as_its_exif_orientation_shows_it(tmp_path):
    """Found by a review: a phone photo stored sideways (orientation 6) was read as stored, while
    its labels, like Ultralytics' and Darknet's, are of the image as displayed."""
    from PIL import Image

    from data.eval_dataset import InferenceDataset, read_rgb

    displayed = np.zeros((200, 100, 3), np.uint8)
    displayed[20:60, 10:50] = (255, 0, 0)                     # a red square at x 10..50, y 20..60
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(displayed)))   # 100 x 200, turned back
    exif = stored.getexif()
    exif[0x0112] = 6                                         # "rotate 90 degrees clockwise to display"
    (tmp_path / "images").mkdir()
    stored.save(tmp_path / "images" / "1.png", exif=exif)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "1.txt").write_text("0 0.3 0.2 0.4 0.2\n")   # cx cy w h of the displayed image
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [square]\n")
    record = load_yolo_dataset(tmp_path / "data.yaml", "val").records[0]
    assert (record.width, record.height, record.orientation) == (100, 200, 6)
    np.testing.assert_allclose(record.boxes, [[10, 20, 50, 60]])
    image = read_rgb(record.path, record.orientation)
    np.testing.assert_array_equal(image, displayed)
    _, meta = InferenceDataset.from_source(load_yolo_dataset(tmp_path / "data.yaml", "val"), 64, 64, False)[0]
    assert (meta.transform.orig_w, meta.transform.orig_h) == (100, 200)


def test_yolo_datasets_as_exporters_and_editors_leave_them(tmp_path):
    """Found by a review against Ultralytics' loader: each of these loaded wrongly, partly or not at
    all. Roboflow writes `../train/images` beside the yaml, Windows editors a byte order mark, macOS
    `._x.jpg` files; folders may be linked in; pose labels carry keypoints after the box; `names`
    keys may be quoted; a label line may be repeated."""
    root = tmp_path / "export"
    for split in ("train", "valid"):
        write_image(root / split / "images" / "a.jpg", 40, 40)
        (root / split / "labels").mkdir(parents=True)
        (root / split / "labels" / "a.txt").write_text("\ufeff0 0.5 0.5 0.5 0.5 0.45 0.45 0.55 0.55\n"
                                                        "0 0.5 0.5 0.5 0.5 0.45 0.45 0.55 0.55\n")
        (root / split / "images" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_image(tmp_path / "more" / "images" / "b.jpg", 40, 40)
    (root / "train" / "images" / "linked").symlink_to(tmp_path / "more" / "images")
    (root / "data.yaml").write_text("\ufefftrain: ../train/images\nvalidation: ../valid/images\n"
                                    "kpt_shape: [2, 2]\nnc: '1'\nnames: {'0': square}\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1 label line repeats an earlier line.*a.txt:2"):
        val = load_yolo_dataset(root / "data.yaml", "val")
    assert val.class_names == ["square"] and [r.path.name for r in val.records] == ["a.jpg"]
    np.testing.assert_allclose(val.records[0].boxes, [[10, 10, 30, 30]])   # the box, not the keypoints'
    with pytest.warns(UserWarning, match="repeat"):
        train = load_yolo_dataset(root / "data.yaml", "train")
    assert sorted(r.path.name for r in train.records) == ["a.jpg", "b.jpg"]   # b.jpg through the link


def test_coco_images_whose_files_differ_from_the_json_agree_in_training_and_evaluation(tmp_path):
    """Found by a review: training scaled the boxes to a file of another size than the json's, while
    evaluation mapped detections to the file's pixels and compared them with the json's boxes."""
    from PIL import Image

    from data.eval_dataset import InferenceDataset
    from data.geometry import boxes_to_original
    from data.train_dataset import DetectionTrainDataset
    from data.augment import AugmentConfig

    images = tmp_path / "images"
    write_image(images / "small.jpg", 32, 24)                # resized to half after annotating at 64 x 48
    displayed = np.zeros((40, 20, 3), np.uint8)
    displayed[5:15, 2:12] = 255
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(displayed)))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(images / "turned.png", exif=exif)            # annotated as displayed: 20 x 40
    stored.resize((20, 10), Image.NEAREST).save(images / "turned_half.png", exif=exif)   # and then halved
    coco = {"categories": [{"id": 1, "name": "box"}],
            "images": [{"id": 1, "file_name": "small.jpg", "width": 64, "height": 48},
                       {"id": 2, "file_name": "turned.png", "width": 20, "height": 40},
                       {"id": 3, "file_name": "turned_half.png", "width": 20, "height": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [16, 8, 32, 24]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 5, 10, 10]},
                            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [2, 5, 10, 10]}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    source = load_coco_json(images, tmp_path / "instances.json")
    evaluation = InferenceDataset.from_source(source, 64, 64, letterbox=False)
    for index, record in enumerate(source.records):
        network_box = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
        _, meta = evaluation[index]
        mapped = boxes_to_original(network_box, meta.transform)   # where a detection lands for pycocotools
        torch.testing.assert_close(mapped, network_box * torch.tensor([record.width / 64, record.height / 64] * 2))
    train = DetectionTrainDataset(source, AugmentConfig(64), augment=False)
    image, labels = train[1]
    assert image[:, 10:22, 8:36].float().mean() > 250              # the square where the json says (y 8..24, x 6..38)
    np.testing.assert_allclose(labels[0, 1:].numpy(), [7 / 20, 10 / 40, 10 / 20, 10 / 40], atol=1e-6)
    # found by a review: a turned file resized after annotating was read as stored (only an exact
    # size match turned it), its pixels stretched into the annotation's frame
    half, half_labels = train[2]
    assert half[:, 10:22, 8:36].float().mean() > 200 and half.float().mean() < 100      # blurred by the upscale
    np.testing.assert_allclose(half_labels[0, 1:].numpy(), labels[0, 1:].numpy())


@pytest.mark.parametrize("orientation", [3, 6])
def test_tiffs_are_read_as_opencv_turns_them_and_pngs_without_exif_are_not_decoded(tmp_path, orientation,
                                                                                   monkeypatch):
    """Found by a review: OpenCV turns a TIFF by its orientation tag itself (orientations 2-4;
    5-8 it cannot read) and PIL reports its turned size, so turning it again undid the tag; and
    PIL decodes a whole PNG to look for an EXIF block it does not have."""
    from PIL import Image, PngImagePlugin

    from data.eval_dataset import read_rgb
    from data.sources import displayed_size

    stored = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "a.tif", exif=exif)
    width, height, turn = displayed_size(tmp_path / "a.tif")
    assert turn == 1
    if orientation == 3:                                      # OpenCV gives the displayed pixels
        with Image.open(tmp_path / "a.tif") as reopened:
            np.testing.assert_array_equal(read_rgb(tmp_path / "a.tif", turn), np.asarray(reopened.convert("RGB")))
        assert (width, height) == (30, 20)
    Image.fromarray(stored).save(tmp_path / "b.png")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("decoded the PNG"))
    assert displayed_size(tmp_path / "b.png") == (30, 20, 1)


def test_a_repeated_line_does_not_hide_labels_in_pixel_coordinates(tmp_path):
    """Found by a review: the line count was taken before repeats were dropped, so a repeat turned
    the 'every line outside [0, 1]' error into a warning, and every box was clipped away."""
    write_image(tmp_path / "images" / "a.jpg", 64, 48)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 32 24 10 10\n0 32 24 10 10\n0 12 14 8 8\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [a]\nnc: '1'\n")
    with pytest.warns(UserWarning, match="repeat"), pytest.raises(ValueError, match="every one of its 2 label lines"):
        load_yolo_dataset(tmp_path / "data.yaml", "val")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: {'--1': a}\n")
    with pytest.raises(ValueError, match=r"data.yaml: 'names' keys must be 0..0, found \['--1'\]"):
        load_yolo_dataset(tmp_path / "data.yaml", "val")


@pytest.mark.parametrize("content, line", [(b"\xff", 1), (b"a\nb\n\xff", 3), (b"a\r\nb\xff", 2), (b"a\rb\r\xff", 3)])
def test_text_that_is_not_utf8_is_named_with_its_line(tmp_path, content, line):
    from data.sources import read_utf8

    path = tmp_path / "names.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"names.txt:{line}: expected UTF-8 text, found the byte 0xff, which is not"):
        read_utf8(path)
