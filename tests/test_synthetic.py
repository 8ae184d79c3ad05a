"""The generated shapes dataset: determinism, exact labels, YOLO txt format, loading through `data`."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import yaml

from data import load_yolo_dataset
from data.synthetic import (SHAPE_CLASSES, coverage_box, make_shapes_dataset, render_image, shape_coverage,
                            shape_vertices)
from detector import load_darknet
from detector.cfgs import cfg_path


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_labels(path):
    rows = [line.split() for line in path.read_text().splitlines()]
    return np.array([[float(v) for v in row] for row in rows]).reshape(-1, 5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "ds"
    return make_shapes_dataset(root, n_train=12, n_val=6, img_size=96, seed=3).parent


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    again = make_shapes_dataset(tmp_path / "again", n_train=12, n_val=6, img_size=96, seed=3).parent
    assert _files(again) == _files(dataset)


def test_other_seed_gives_other_images(dataset, tmp_path):
    other = make_shapes_dataset(tmp_path / "other", n_train=12, n_val=6, img_size=96, seed=4).parent
    first, second = _files(dataset), _files(other)
    assert first.keys() == second.keys()
    assert first["images/train/000000.jpg"] != second["images/train/000000.jpg"]


def test_prefix_of_a_split_does_not_depend_on_its_length(dataset, tmp_path):
    shorter = make_shapes_dataset(tmp_path / "short", n_train=5, n_val=2, img_size=96, seed=3).parent
    files = _files(shorter)
    assert len([name for name in files if name.startswith("images/train/")]) == 5
    for name, content in files.items():
        if name != "data.yaml":
            assert _files(dataset)[name] == content, name


def test_layout_and_data_yaml(dataset):
    spec = yaml.safe_load((dataset / "data.yaml").read_text())
    assert spec["nc"] == len(SHAPE_CLASSES) == 4
    assert [spec["names"][i] for i in range(spec["nc"])] == list(SHAPE_CLASSES)
    for split, count in (("train", 12), ("val", 6)):
        images = sorted((dataset / spec[split]).glob("*.jpg"))
        labels = sorted((dataset / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
        image = cv2.imread(str(images[0]))
        assert image.shape == (96, 96, 3)


def test_labels_are_yolo_txt_inside_the_image(dataset):
    for label_path in (dataset / "labels").rglob("*.txt"):
        table = _read_labels(label_path)
        assert 1 <= len(table) <= 4, label_path
        classes, centres, sizes = table[:, 0], table[:, 1:3], table[:, 3:5]
        assert np.all(classes == np.round(classes)) and np.all((classes >= 0) & (classes < 4))
        assert np.all(sizes > 0)
        assert np.all(centres - sizes / 2 >= -1e-6) and np.all(centres + sizes / 2 <= 1 + 1e-6)


def test_shapes_in_one_image_are_disjoint_and_sized():
    image, boxes, classes = render_image(np.random.default_rng(7), 128, max_objects=4)
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    assert boxes.shape == (len(classes), 4) and len(classes) >= 1
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            ix = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            iy = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            assert ix <= 0 or iy <= 0
    sizes = boxes[:, 2:] - boxes[:, :2]
    # extent in [0.1, 0.4] * 128; a square turned by 15 degrees spans cos 15 + sin 15 = 1.22 times its side
    assert np.all(sizes >= 0.1 * 128 - 1) and np.all(sizes <= 0.4 * 128 * 1.23 + 1)


@pytest.mark.parametrize("name, centre, extent, box", [
    ("square", (40.0, 30.0), 20.0, [30, 20, 50, 40]),     # edges on pixel borders: exact
    ("circle", (40.0, 30.0), 20.0, [30, 20, 50, 40]),
    ("cross", (40.0, 30.0), 30.0, [25, 15, 55, 45]),
    ("triangle", (40.0, 30.0), 20.0, [31, 20, 49, 35]),   # apex up: 10*sqrt(3) wide, 15 tall
])
def test_coverage_box_is_the_tight_box_of_the_shape(name, centre, extent, box):
    alpha = shape_coverage(name, np.array(centre), extent, 0.0, 64)
    assert alpha.min() == 0 and alpha.max() == 1
    assert coverage_box(alpha) == pytest.approx(box, abs=1)
    if name == "square":
        assert coverage_box(alpha) == box
        assert np.all(alpha[20:40, 30:50] == 1) and alpha.sum() == pytest.approx(400, abs=1)


def test_rotated_shape_stays_inside_its_vertices_box():
    vertices = np.concatenate(shape_vertices("triangle", 30.0, 47.0)) + np.array([32.0, 32.0])
    x1, y1 = np.floor(vertices.min(axis=0))
    x2, y2 = np.ceil(vertices.max(axis=0))
    bx1, by1, bx2, by2 = coverage_box(shape_coverage("triangle", np.array([32.0, 32.0]), 30.0, 47.0, 64))
    assert x1 <= bx1 and y1 <= by1 and bx2 <= x2 and by2 <= y2
    assert (bx2 - bx1) >= (x2 - x1) - 2 and (by2 - by1) >= (y2 - y1) - 2


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_shapes_dataset(tmp_path, 2, 1, 96, 0)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_regenerating_replaces_a_previous_dataset_whole(tmp_path):
    make_shapes_dataset(tmp_path / "ds", 6, 2, 96, 0)
    make_shapes_dataset(tmp_path / "ds", 3, 2, 96, 0)
    assert len(list((tmp_path / "ds" / "images" / "train").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging folder left behind


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_train=0, n_val=0), "both 0"),
    (dict(n_train=-1, n_val=2), "n_train"),
    (dict(n_train=2, n_val=2, img_size=16), "img_size"),
    (dict(n_train=2, n_val=2, size_range=(0.5, 0.2)), "size_range"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_shapes_dataset(tmp_path / "ds", **kwargs)


def test_loads_through_data_load_yolo_dataset(dataset):
    source = load_yolo_dataset(dataset / "data.yaml", split="val")
    assert source.class_names == list(SHAPE_CLASSES)
    assert len(source.records) == 6
    for record in source.records:
        labels = _read_labels(dataset / "labels" / "val" / f"{record.path.stem}.txt")
        assert (record.width, record.height) == (96, 96)
        np.testing.assert_array_equal(record.classes, labels[:, 0].astype(np.int64))
        expected = np.concatenate([labels[:, 1:3] - labels[:, 3:5] / 2,
                                   labels[:, 1:3] + labels[:, 3:5] / 2], axis=1) * 96
        np.testing.assert_allclose(record.boxes, expected, atol=1e-3)


def test_demo_cfg_fits_the_dataset():
    """detector/cfgs/demo-tiny.cfg: the dataset's classes, anchors fitted to its boxes, < 2 MB of weights."""
    model = load_darknet(cfg_path("demo-tiny.cfg"))
    assert (model.net.width, model.net.height) == (160, 160)
    assert [head.num_classes for head in model.heads] == [len(SHAPE_CLASSES)] * 2
    assert sorted(head.stride for head in model.heads) == [16, 32]
    weights_bytes = 20 + sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert weights_bytes < 2_000_000
    sizes = np.concatenate([(b[:, 2:] - b[:, :2]) for b in
                            (render_image(np.random.default_rng([0, 0, i]), 160)[1] for i in range(200))])
    anchors = model.heads[0].all_anchors.numpy()                      # [6, 2]
    inter = np.minimum(sizes[:, None], anchors[None]).prod(-1)        # [n, 6]
    iou = inter / (sizes.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)
    assert iou.max(axis=1).mean() >= 0.85
    assert np.bincount(iou.argmax(axis=1), minlength=6).min() >= 0.05 * len(sizes)  # every anchor is used
