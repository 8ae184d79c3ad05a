"""COCO evaluation and the `detect eval` / `detect predict` CLI (detector.evaluate, detector.cli_*).

The end-to-end tests use a stand-in detector that finds pure red and pure green rectangles in its input
and reports them in the eval-mode output format, on generated images whose labels are exact; so a
correct pipeline (read, resize/letterbox, post-process, map back, COCOeval) must score mAP50 = 1.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import detector
from data.eval_dataset import InferenceDataset
from data.sources import load_coco_json, load_yolo_dataset
from detector.evaluate import coco_metrics, evaluate
from detector.predict import inference_copy, make_loader, write_image_atomic
from yolo_admm.cli import main as yolo_admm_main


def ground_truth(boxes_by_class: dict[int, list[list[float]]]) -> dict:
    """COCO gt with one 100x100 image and xywh boxes per category id."""
    anns = [{"id": i + 1, "image_id": 1, "category_id": cid, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for i, (cid, box) in enumerate((c, b) for c, bs in boxes_by_class.items() for b in bs)]
    return {"images": [{"id": 1, "width": 100, "height": 100}], "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_one_class_found_one_missed_gives_half():
    gt = ground_truth({1: [[10, 10, 40, 40]], 2: [[60, 60, 30, 30]]})
    result = coco_metrics(gt, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}],
                          per_class=True)
    assert result.map50_95 == pytest.approx(0.5) and result.map50 == pytest.approx(0.5)
    assert [(c.name, c.ap50_95, c.ap50) for c in result.per_class] == [
        ("a", pytest.approx(1.0), pytest.approx(1.0)), ("b", 0.0, 0.0)]
    assert result.images == 1 and len(result.stats) == 12
    assert len(result.summary.splitlines()) == 12 and "Average Precision" in result.summary


def test_false_positive_ranked_first_halves_precision():
    gt = ground_truth({1: [[10, 10, 40, 40]]})
    results = [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.9},   # FP
               {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.8}]   # TP
    assert coco_metrics(gt, results).map50 == pytest.approx(0.5)


def test_no_detections_scores_zero():
    result = coco_metrics(ground_truth({1: [[10, 10, 40, 40]]}), [])
    assert result.map50_95 == 0.0 and result.map50 == 0.0 and len(result.summary.splitlines()) == 12


COLOURS_RGB = ((255, 0, 0), (0, 255, 0))  # class 0 red, class 1 green


class RectangleFinder(torch.nn.Module):
    """A stand-in detector: the bounding box of the pure red (class 0) and pure green (class 1)
    pixels of its input, as one eval-mode head Tensor[B, 1, 1, 2, 5 + 2] in input pixels."""

    def __init__(self, width: int, height: int, letter_box: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.net = SimpleNamespace(width=width, height=height, channels=3, letter_box=int(letter_box))
        self.heads = [SimpleNamespace(num_classes=2)]
        self.class_names = None

    def accepts_size(self, height: int, width: int) -> bool:      # any size, as a real cfg of stride 32 would
        return height > 0 and width > 0 and not height % 32 and not width % 32

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = x.new_zeros(x.shape[0], 1, 1, 2, 7)
        for b in range(x.shape[0]):
            for cls, colour in enumerate(COLOURS_RGB):
                target = torch.tensor(colour, dtype=x.dtype).view(3, 1, 1) / 255
                ys, xs = torch.nonzero(((x[b] - target).abs() < 0.25).all(0), as_tuple=True)
                if len(xs):
                    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                    out[b, 0, 0, cls, :5] = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1,
                                                         torch.tensor(1.0)])
                    out[b, 0, 0, cls, 5 + cls] = 1.0
        return [out]


def write_rectangle_dataset(root: Path, count: int = 6) -> Path:
    """Images of various sizes with one red and one green rectangle, exact YOLO txt labels."""
    rng = np.random.default_rng(0)
    for index in range(count):
        width, height = int(rng.integers(90, 200)), int(rng.integers(90, 200))
        image = np.full((height, width, 3), 40, np.uint8)
        lines = []
        for cls, colour in enumerate(COLOURS_RGB):
            w, h = int(rng.integers(30, width // 2)), int(rng.integers(30, height // 2))
            x, y = (0, 0) if cls == 0 else (width - w, height - h)
            image[y:y + h, x:x + w] = colour
            lines.append(f"{cls} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}")
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "images" / f"{index + 1}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        (root / "labels" / f"{index + 1}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("val: images\nnames: [red, green]\n")
    return root / "data.yaml"


@pytest.mark.parametrize("letterbox", [False, True])
def test_evaluate_finds_every_object_through_resize_or_letterbox(tmp_path, letterbox):
    source = load_yolo_dataset(write_rectangle_dataset(tmp_path))
    model = RectangleFinder(128, 96, letterbox)
    loader = make_loader(InferenceDataset.from_source(source, 128, 96, letterbox), 4, 0, torch.device("cpu"))
    model.train()
    result = evaluate(model, loader, source, progress=False)
    assert model.training  # the model itself is left as it was
    assert result.map50 == pytest.approx(1.0) and result.map50_95 > 0.85
    assert result.images == 6


def test_evaluate_maps_classes_to_sorted_coco_category_ids(tmp_path):
    yolo = load_yolo_dataset(write_rectangle_dataset(tmp_path))
    gt = yolo.to_coco()
    for category, new_id in zip(gt["categories"], (17, 5)):  # class 0 "red" -> 17: red sorts second
        category["id"] = new_id
    for ann in gt["annotations"]:
        ann["category_id"] = {1: 17, 2: 5}[ann["category_id"]]
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    coco = load_coco_json(tmp_path / "images", tmp_path / "instances.json")
    assert coco.class_names == ["green", "red"]
    model = RectangleFinder(128, 128, False)  # class 0 = red, but the json's class 0 is green
    loader = make_loader(InferenceDataset.from_source(coco, 128, 128, False), 2, 0, torch.device("cpu"))
    assert evaluate(model, loader, coco, progress=False).map50 == pytest.approx(0.0)


@pytest.fixture
def rectangle_model(monkeypatch, tmp_path):
    """`detector.load_darknet` replaced by the RectangleFinder (the CLI's model loading is the real
    code: it finds the files `m.cfg`, `m.weights` and `w` in the working folder, this test's)."""
    monkeypatch.chdir(tmp_path)
    for name in ("m.cfg", "m.weights", "w"):
        (tmp_path / name).write_bytes(b"")
    loaded = []

    def fake_load_darknet(cfg, weights=None, partial=False):
        loaded.append((cfg, weights))
        return RectangleFinder(160, 128, letter_box=True)

    monkeypatch.setattr(detector, "load_darknet", fake_load_darknet, raising=False)
    return loaded


def test_cli_eval_yolo_data_writes_json(tmp_path, rectangle_model, capsys):
    data_yaml = write_rectangle_dataset(tmp_path / "ds")
    out = tmp_path / "metrics.json"
    code = yolo_admm_main(["detect", "eval", "--cfg", "m.cfg", "--weights", "m.weights", "--data", str(data_yaml),
                           "--workers", "0", "--batch-size", "3", "--per-class", "--json-out", str(out)])
    assert code == 0 and rectangle_model == [("m.cfg", "m.weights")]
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"map50_95", "map50", "map75", "ap_small", "ap_medium", "ap_large", "images"}
    assert metrics["images"] == 6 and metrics["map50"] == pytest.approx(1.0)
    captured = capsys.readouterr()
    printed = captured.out
    assert "detect: 100%" in captured.err                                   # the progress bar, unless asked
    assert yolo_admm_main(["detect", "eval", "--cfg", "m.cfg", "--weights", "m.weights", "--data", str(data_yaml),
                           "--workers", "0", "--no-progress"]) == 0
    assert "detect:" not in capsys.readouterr().err
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert "red" in printed and "green" in printed


@pytest.mark.parametrize("extra, message", [
    (["--img-size", "100"], "must be a positive multiple of 32"),
    (["--data", "x.yaml", "--images", "i"], "either --data, or --images with --annotations"),
    ([], "a dataset is needed"),
])
def test_cli_eval_bad_arguments_are_clear_errors(tmp_path, rectangle_model, capsys, extra, message):
    code = yolo_admm_main(["detect", "eval", "--cfg", "m.cfg", "--weights", "m.weights", *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_eval_class_count_mismatch(tmp_path, rectangle_model, capsys):
    data_yaml = write_rectangle_dataset(tmp_path / "ds", count=1)
    data_yaml.write_text("val: images\nnames: [red, green, blue]\n")
    code = yolo_admm_main(["detect", "eval", "--cfg", "m.cfg", "--weights", "w", "--data", str(data_yaml)])
    assert code == 2 and "predicts 2 classes but the dataset has 3" in capsys.readouterr().err


def test_cli_eval_refuses_a_dataset_with_the_models_classes_in_another_order(tmp_path, monkeypatch, capsys):
    """Found by a review: a model carrying its class names (a compact archive) scored a dataset with
    the same names in another order, silently near 0. Names spelled otherwise (Darknet's coco.names
    against COCO's json) are not refused."""
    data_yaml = write_rectangle_dataset(tmp_path / "ds", count=2)
    model = RectangleFinder(160, 128, letter_box=True)
    monkeypatch.setattr(detector, "load_darknet", lambda cfg, weights=None, partial=False: model, raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("m.cfg", "m.weights"):
        (tmp_path / name).write_bytes(b"")
    command = ["detect", "eval", "--cfg", "m.cfg", "--weights", "m.weights", "--data", str(data_yaml), "--workers", "0"]
    for names in (["red", "green"], ["rouge", "vert"], None):
        model.class_names = names
        assert yolo_admm_main(command) == 0
    model.class_names = ["green", "red"]
    assert yolo_admm_main(command) == 2
    assert (f"{data_yaml}: class 0 is 'red', but 'green' in the class names of m.weights (the same classes in "
            f"another order)") in capsys.readouterr().err


def test_cli_predict_writes_annotated_images_and_json(tmp_path, rectangle_model):
    write_rectangle_dataset(tmp_path / "ds", count=3)
    names = tmp_path / "rg.names"
    names.write_text("red\ngreen\n")
    images = tmp_path / "ds" / "images"
    code = yolo_admm_main(["detect", "predict", "--cfg", "m.cfg", "--weights", "w", str(images / "1.png"),
                           str(images), "--out", str(tmp_path / "out"), "--names", str(names)])
    assert code == 0
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["annotated"] for r in results] == ["1.jpg", "1_1.jpg", "2.jpg", "3.jpg"]
    for result in results:
        assert [d["class_name"] for d in result["detections"]] == ["red", "green"]
        red = result["detections"][0]["box_xyxy"]
        assert red[0] == pytest.approx(0, abs=1.5) and red[1] == pytest.approx(0, abs=1.5)
        annotated = cv2.imread(str(tmp_path / "out" / result["annotated"]))
        assert annotated.shape == (result["height"], result["width"], 3)
    again = ["detect", "predict", "--cfg", "m.cfg", "--weights", "w", str(images), "--names", str(names)]
    assert yolo_admm_main([*again, "--out", str(tmp_path / "out")]) == 0           # its own files: replaced
    # found by a review: a file of the user's with an annotated image's name was replaced without a word
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "2.jpg").write_text("important")
    assert yolo_admm_main([*again, "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "2.jpg").read_text() == "important"


def test_cli_predict_on_folders_as_users_keep_them(tmp_path, rectangle_model, capsys, monkeypatch):
    """Found by a review on real image collections: a file name that is not UTF-8 crashed OpenCV (a
    segfault), one unreadable file stopped the run with no JSON, sub-folders were skipped, --out set
    to the input folder overwrote the photos, and a missing --names file got errno's words."""
    import os

    import detector.predict as predict_module

    write_rectangle_dataset(tmp_path / "ds", count=3)
    photos = tmp_path / "ds" / "images"
    (photos / "2019" / "summer").mkdir(parents=True)
    os.replace(photos / "2.png", photos / "2019" / "summer" / "2.png")
    os.replace(photos / "3.png", photos / os.fsdecode(b"caf\xe9.png"))   # a Latin-1 name
    (photos / "notes.jpg").write_text("not an image")
    (photos / "clip.gif").write_bytes(b"GIF89a")
    command = ["detect", "predict", "--cfg", "m.cfg", "--weights", "w", str(photos), "--out", str(tmp_path / "out")]
    assert yolo_admm_main(command) == 0
    err = capsys.readouterr().err
    assert "notes.jpg: not a readable image, left out" in err and "1 image(s) of a type not read here" in err
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert sorted(r["annotated"] for r in results) == ["1.jpg", "2.jpg", os.fsdecode(b"caf\xe9.jpg")]
    assert all(len(r["detections"]) == 2 for r in results)

    assert yolo_admm_main([*command[:6], str(photos / "1.png"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1.jpg", "detections.json"]   # replaced

    assert yolo_admm_main([*command[:-1], str(photos / "2019" / "summer")]) == 2      # --out among the inputs
    assert "their annotated copies would replace them" in capsys.readouterr().err
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "1.png").symlink_to(photos / "1.png")
    assert yolo_admm_main([*command[:6], str(tmp_path / "links"), "--out", str(tmp_path / "links")]) == 2
    assert (tmp_path / "links" / "1.png").is_symlink()                                 # a folder of links too
    inside = [*command[:6], str(photos), "--out", str(photos / "annotated")]
    assert yolo_admm_main(inside) == 0 and yolo_admm_main(inside) == 0                  # its own copies left out
    assert len(json.loads((photos / "annotated" / "detections.json").read_text())) == 3
    shutil.rmtree(photos / "annotated")
    capsys.readouterr()
    assert yolo_admm_main([*command, "--names", str(tmp_path / "none.names")]) == 2
    assert f"--names {tmp_path}/none.names: expected a .names file, a data.yaml or a COCO json, found nothing" in \
        capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("names: [a, b\n")          # found by a review: a bare yaml traceback
    assert yolo_admm_main([*command, "--names", str(tmp_path / "bad.yaml")]) == 2
    assert f"{tmp_path}/bad.yaml: not valid yaml (while parsing a flow sequence" in capsys.readouterr().err

    real_read, reads = predict_module.read_rgb, []

    def fail_on_the_second(path, orientation=1):
        reads.append(path)
        if len(reads) == 2:
            raise ValueError(f"{path}: not a readable image")
        return real_read(path, orientation)

    assert yolo_admm_main([*command[:-1], str(tmp_path / "stopped")]) == 0             # a full run first
    monkeypatch.setattr(predict_module, "read_rgb", fail_on_the_second)
    assert yolo_admm_main([*command[:6], str(photos / "2019"), str(photos / "1.png"), "--out",
                           str(tmp_path / "stopped")]) == 2
    listed = [entry["annotated"] for entry in json.loads((tmp_path / "stopped" / "detections.json").read_text())]
    assert listed[0] == "2.jpg" and sorted(listed[1:]) == ["1.jpg", os.fsdecode(b"caf\xe9.jpg")]   # done, and the
    monkeypatch.setattr(predict_module, "read_rgb", real_read)     # earlier run's images, still listed to be replaced
    assert yolo_admm_main([*command[:6], str(photos / "1.png"), "--out", str(tmp_path / "stopped")]) == 0
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["1.jpg", "detections.json"]


TINY_CFG = """[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=8
groups=8
size=3
stride=2
pad=1
activation=mish

[convolutional]
size=1
stride=1
pad=1
filters=21
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=2
num=3
"""


def test_inference_copy_folds_batchnorm_without_changing_outputs_or_the_original(tmp_path):
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_CFG)
    model = detector.load_darknet(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.uniform_(-0.5, 0.5, generator=generator)
            bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
            bn.running_var.uniform_(0.2, 2.0, generator=generator)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = model.eval()(x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_predicted_images_are_written_whole_or_refused(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    image[2:4, 3:5] = 255
    write_image_atomic(tmp_path / "a.PNG", image)
    assert np.array_equal(cv2.imread(str(tmp_path / "a.PNG")), image)
    with pytest.raises(ValueError, match=r"b\.xyz: could not encode the image \(unsupported suffix '\.xyz'"):
        write_image_atomic(tmp_path / "b.xyz", image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.PNG"]  # no temporary file left behind
