"""The bad-input catalogue (issue 6): bad Darknet files, bad data, bad settings and failures, each
driven through the real command line (`yolo_admm.cli.main`, in-process) on tiny generated inputs.

Every case asserts the exit status (2 for an error, 130 for Ctrl-C, 0 where the input is legitimate
and at most a warning is due), that no traceback is printed, that the message names the file /
line / layer with what was expected and what was found, and that nothing written before the run
(an earlier run's weights, metrics or checkpoints in the output folder) was changed or removed.

Decisions the catalogue pins down:
- an image without a label file, or with an empty one, is a background image (YOLO format): no
  warning; a split where no image has a label file gets a warning (a misplaced labels folder?);
- label coordinates outside [0, 1] are clipped as Darknet does, with a warning naming the first
  such line; when every line of a split is outside (pixel coordinates), it is an error;
- a COCO json without `info` is accepted (`DetectionSource.to_coco` gives pycocotools one);
- an image file that cannot be read is an error naming it, also from a DataLoader worker.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import pytest
import torch
import yaml

import detector
from data.sources import load_yolo_dataset
from data.synthetic import make_shapes_dataset
from detector.train import DetectionLoss
from engine import load_checkpoint
from engine.run_lock import LOCK_FILE
from yolo_admm.cli import main

from helpers import tiny_yolo_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A 64x64 detector with one stride-16 head for the 4 classes of data.synthetic.
TINY_CFG = tiny_yolo_cfg("""\
batch=8
subdivisions=1
width=64
height=64
channels=3
momentum=0.9
decay=0.0005
learning_rate=0.001
burn_in=0
policy=steps
steps=1000
scales=0.1
""", (8, 16, 16, 32))
EARLIER_METRICS = '{"map50": 0.5, "map50_95": 0.3}\n'
CORRUPT_JPEG = b"\xff\xd8\xff\xe0 a JPEG header, then nothing an image decoder can use"


def line_of(text: str, needle: str) -> int:
    """1-based line number of the first line of `text` that is `needle`."""
    return text.splitlines().index(needle) + 1


MAXPOOL_LINE = line_of(TINY_CFG, "[maxpool]")
FILTERS_LINE = line_of(TINY_CFG, "filters=16")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A shapes dataset (4 train, 2 val images), the tiny cfg and weights for it."""
    root = tmp_path_factory.mktemp("base")
    make_shapes_dataset(root / "ds", n_train=4, n_val=2, img_size=96, seed=0, max_objects=2)
    (root / "tiny.cfg").write_text(TINY_CFG)
    torch.manual_seed(0)
    detector.write_weights(root / "tiny.weights", detector.load_darknet(root / "tiny.cfg"))
    return root


@dataclass
class Workspace:
    """One case's folder: a copy of the base inputs, and an output folder holding an earlier run's
    weights and metrics (which a failing run must leave as they are)."""

    root: Path

    @classmethod
    def create(cls, root: Path, base: Path) -> "Workspace":
        shutil.copytree(base / "ds", root / "ds")
        for name in ("tiny.cfg", "tiny.weights"):
            shutil.copy(base / name, root / name)
        (root / "out").mkdir()
        (root / "out" / "metrics.json").write_text(EARLIER_METRICS)
        shutil.copy(base / "tiny.weights", root / "out" / "tiny.weights")
        return cls(root)

    @property
    def ds(self) -> Path:
        return self.root / "ds"

    @property
    def data(self) -> Path:
        return self.ds / "data.yaml"

    @property
    def cfg(self) -> Path:
        return self.root / "tiny.cfg"

    @property
    def weights(self) -> Path:
        return self.root / "tiny.weights"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def names(self) -> dict[str, str]:
        """Placeholders of the expected messages."""
        return {"root": str(self.root), "ds": str(self.ds), "data": str(self.data), "cfg": str(self.cfg),
                "weights": str(self.weights), "out": str(self.out)}

    def write(self, relative: str, content: str | bytes | None) -> Path:
        """Write `content` to `root/relative` (None: delete that file); returns the path."""
        path = self.root / relative
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        return path

    def coco_json(self, edit: Callable[[dict], None]) -> Path:
        """The val split as a COCO instances json, changed by `edit`."""
        ground_truth = load_yolo_dataset(self.data, "val").to_coco()
        edit(ground_truth)
        return self.write("instances.json", json.dumps(ground_truth))


# ------------------------------------------------------------------------------------ command lines
def detect_eval(ws: Workspace, *extra: str, cfg: Path | None = None, weights: Path | None = None,
                coco: Path | None = None, images: Path | None = None, json_out: Path | None = None) -> list[str]:
    dataset = (["--images", str(images or ws.ds / "images" / "val"), "--annotations", str(coco)] if coco
               else ["--data", str(ws.data)])
    return ["detect", "eval", "--cfg", str(cfg or ws.cfg), "--weights", str(weights or ws.weights), *dataset,
            "--device", "cpu", "--json-out", str(json_out or ws.out / "metrics.json"), *extra]


def detect_train(ws: Workspace, *extra: str, data: Path | None = None, out: Path | None = None,
                 epochs: int = 1) -> list[str]:
    return ["detect", "train", "--cfg", str(ws.cfg), "--data", str(data or ws.data), "--out", str(out or ws.out),
            "--epochs", str(epochs), "--batch-size", "2", "--accumulate", "1", "--no-augment", "--device", "cpu",
            "--workers", "0", "--eval-every", "0", *extra]


def detect_prune(ws: Workspace, *extra: str, data: Path | None = None, out: Path | None = None) -> list[str]:
    return ["detect", "prune", "--cfg", str(ws.cfg), "--weights", str(ws.weights), "--data", str(data or ws.data),
            "--out", str(out or ws.out / "prune"), "--sparsity", "0.5", "--admm-iters", "1", "--epochs-per-iter", "1",
            "--retrain-epochs", "1", "--batch-size", "2", "--device", "cpu", "--export", "", "--no-progress", *extra]


def earlier_run(ws: Workspace, *extra: str) -> None:
    """A `detect train` run that a case builds on; it must succeed (its stderr is in the report).
    It then waits past the second, so that the case's own run takes the lock in another second."""
    code = main(detect_train(ws, *extra))
    assert code == 0, f"the earlier run of the case failed with status {code}"
    time.sleep(1.0)


# ------------------------------------------------------------------------------------ bad inputs
def other_model_weights(ws: Workspace) -> Path:
    other = ws.write("other.cfg", TINY_CFG.replace("filters=8", "filters=12"))
    detector.write_weights(ws.root / "other.weights", detector.load_darknet(other))
    return ws.root / "other.weights"


def _without_progress(args_json: Path) -> None:
    """args.json as runs before --no-progress wrote it."""
    saved = json.loads(args_json.read_text())
    saved.pop("progress")
    args_json.write_text(json.dumps(saved))


def pruned_weights(ws: Workspace) -> Path:
    """The workspace's model with half of its conv weights zeroed (a review found a 50% model not
    warned of), as pruned.weights."""
    model = detector.load_darknet(ws.cfg, ws.weights)
    for name, weight in model.named_parameters():
        if name.endswith("conv.weight"):
            weight.data[weight.abs() < weight.abs().flatten().quantile(0.5)] = 0
    detector.write_weights(ws.root / "pruned.weights", model)
    return ws.root / "pruned.weights"


def yaml_with_names(ws: Workspace, names: str) -> Path:
    return ws.write("ds/other.yaml", f"train: images/train\nval: images/val\nnames: [{names}]\n")


def corrupt_image_in_coco_eval(ws: Workspace) -> list[str]:
    """COCO json eval (which reads the images only in the DataLoader, here in a worker process)."""
    argv = detect_eval(ws, "--workers", "1", coco=ws.coco_json(lambda gt: None))
    ws.write("ds/images/val/000001.jpg", CORRUPT_JPEG)
    return argv


def loss_patch(from_call: int, make_result: Callable[[tuple], tuple]):
    """A case patch: from the `from_call`-th call on, the detection loss returns
    `make_result(real result)` (which may raise instead)."""
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        original, calls = DetectionLoss.__call__, itertools.count(1)

        def loss(self, model, batch):
            result = original(self, model, batch)
            return make_result(result) if next(calls) >= from_call else result

        monkeypatch.setattr(DetectionLoss, "__call__", loss)
    return patch


def nan_loss(result: tuple) -> tuple:
    loss, logs = result
    return loss * float("nan"), logs


def raise_(error: BaseException) -> Callable[[tuple], tuple]:
    def fail(result: tuple) -> tuple:
        raise error
    return fail


# Four training images at batch size 2: two loss calls per epoch, so call 3 is the first of epoch 2
# (detect train) or of the retraining after one ADMM epoch (detect prune).
FIRST_CALL_OF_EPOCH_2 = 3


# ------------------------------------------------------------------------------------ follow-ups
def epoch_1_checkpoint_kept(ws: Workspace, argv: list[str], capsys) -> None:
    assert load_checkpoint(ws.out / "epoch_0001.pt")["epoch"] == 1
    assert not (ws.out / "epoch_0002.pt").exists()


def refused_before_any_stage(ws: Workspace, argv: list[str], capsys) -> None:
    assert not (ws.out / "prune" / "dense.json").exists(), "the dense model was evaluated before the refusal"


def train_resumes_with_the_same_command(ws: Workspace, argv: list[str], capsys) -> None:
    epoch_1_checkpoint_kept(ws, argv, capsys)
    assert main(argv) == 0
    assert "resuming from" in capsys.readouterr().out
    assert len(load_checkpoint(ws.out / "epoch_0002.pt")["history"]) == 2
    assert (ws.out / "tiny.weights").read_bytes() != ws.weights.read_bytes()  # this run's, not the earlier one
    detector.load_darknet(ws.cfg, ws.out / "tiny.weights")  # and complete


def prune_resumes_with_the_same_command(ws: Workspace, argv: list[str], capsys) -> None:
    run = ws.out / "prune"
    finished = {name: (run / name).read_bytes() for name in ("dense.json", "sparsity_0.5/hard_prune.pt")}
    assert not (run / "sparsity_0.5" / "retrained.pt").exists()
    assert main(argv) == 0
    assert json.loads((run / "results.json").read_text())["sweep"][0]["stages"][-1]["stage"] == "retrained"
    for name, content in finished.items():  # skipped on resume, not redone
        assert (run / name).read_bytes() == content, name


def corrected_prune_runs_in_the_same_folder(ws: Workspace, argv: list[str], capsys) -> None:
    """Failed before the dense evaluation, so no stage finished: the folder takes corrected settings."""
    assert not (ws.out / "prune" / "dense.json").exists()
    assert main(detect_prune(ws)) == 0
    assert (ws.out / "prune" / "results.json").is_file()


def a_runs_own_config_resumes_it(ws: Workspace, argv: list[str], capsys) -> None:
    """The config.yaml a run recorded is no user's file: given as --config, it resumes that run."""
    (ws.out / "prune" / "config.yaml").unlink()
    assert main(detect_prune(ws)) == 0
    finished = {path: path.read_bytes() for path in (ws.out / "prune").rglob("*.pt")}
    assert main(argv) == 0
    assert {path: path.read_bytes() for path in (ws.out / "prune").rglob("*.pt")} == finished   # resumed, not redone
    killed = ws.root / "killed"          # found by a review: a run killed before its dense evaluation, alone
    killed.mkdir()                       # its config.yaml then, which records its processes
    record = yaml.safe_load((ws.out / "prune" / "config.yaml").read_text())
    (killed / "config.yaml").write_text(yaml.safe_dump({**record, "out": str(killed)}))
    assert main(detect_prune(ws, "--config", str(killed / "config.yaml"), out=killed)) == 0


@dataclass(frozen=True)
class Case:
    """One catalogue entry.

    Attributes:
        id: the test id.
        argv: the command line (it may also write the case's inputs into the workspace).
        expect: substrings of stderr ({root}, {ds}, {cfg}, ... are the workspace's paths).
        code: the exit status.
        files: written into the workspace first (path relative to it -> content; None deletes).
        absent: substrings that must not be in stderr.
        stdout: substrings of stdout.
        patch: a simulated failure, `patch(monkeypatch)`.
        then: further checks after the run, `then(workspace, argv, capsys)`.
    """

    id: str
    argv: Callable[[Workspace], list[str]]
    expect: tuple[str, ...]
    code: int = 2
    files: dict[str, str | bytes | None] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    stdout: tuple[str, ...] = ()
    patch: Callable | None = None
    then: Callable | None = None


CASES = [
    # --- Darknet files
    Case("weights-truncated",
         lambda ws: detect_eval(ws, weights=ws.write("cut.weights", ws.weights.read_bytes()[:5000])),
         ("{root}/cut.weights: file ends inside layer", "[convolutional]", "the file has 5000 bytes",
          "{cfg} needs")),
    Case("weights-oversized",
         lambda ws: detect_eval(ws, weights=ws.write("long.weights", ws.weights.read_bytes() + bytes(8))),
         ("{root}/long.weights: file has", "needs exactly", "8 bytes are left after layer", "[convolutional]")),
    Case("weights-of-another-model", lambda ws: detect_eval(ws, weights=other_model_weights(ws)),
         ("{root}/other.weights: file has", "{cfg} needs", "(weights for another cfg?)")),
    Case("cfg-unknown-section",
         lambda ws: detect_eval(ws, cfg=ws.write("bad.cfg", TINY_CFG.replace("[maxpool]", "[maxpoool]", 1))),
         (f"{{root}}/bad.cfg:{MAXPOOL_LINE} [maxpoool] (layer 1)", "unknown or unsupported section",
          "expected one of [convolutional], [maxpool]")),
    Case("cfg-bad-value",
         lambda ws: detect_eval(ws, cfg=ws.write("bad.cfg", TINY_CFG.replace("filters=16", "filters=1x6", 1))),
         (f"{{root}}/bad.cfg:{FILTERS_LINE} [convolutional] (layer 2)", "option 'filters'",
          "expected an integer, found '1x6'")),
    Case("eval-batch-size-zero", lambda ws: detect_eval(ws, "--batch-size", "0"),  # named with two others once
         ("--batch-size must be >= 1, found 0",), absent=("--max-det",)),
    Case("eval-max-det-above-coco-s-100", lambda ws: detect_eval(ws, "--max-det", "300"),    # were not scored
         ("--max-det must be at most 100, found 300: COCO's mAP scores the best 100 detections of each image",)),
    # --- data
    Case("classes-disagree-train", lambda ws: detect_train(ws, data=yaml_with_names(ws, "a, b, c, d, e")),
         ("{cfg}: the model predicts 4 classes but the dataset has 5 (a, b, c, d, e)",
          "2 of them label no object (a, e), such as the supercategory a Roboflow COCO export lists first")),
    Case("classes-disagree-prune-before-dense-eval",
         lambda ws: detect_prune(ws, data=yaml_with_names(ws, "a, b, c, d, e")),
         ("{cfg}: the model predicts 4 classes but the dataset has 5",), then=corrected_prune_runs_in_the_same_folder),
    Case("missing-image-dir-yaml",
         lambda ws: detect_train(ws, data=ws.write("ds/other.yaml", "train: images/nowhere\nnames: [a, b, c, d]\n")),
         ("{ds}/other.yaml: split entry 'images/nowhere' -> {ds}/images/nowhere",
          "expected a folder of images or a .txt list, found nothing")),
    Case("missing-image-dir-coco",
         lambda ws: detect_eval(ws, coco=ws.coco_json(lambda gt: None), images=ws.root / "nowhere"),
         ("{root}/nowhere: images folder not found",)),
    Case("corrupt-jpg-yolo", detect_eval,
         ("{ds}/images/val/000001.jpg: expected an image file, found one that cannot be read",),
         files={"ds/images/val/000001.jpg": CORRUPT_JPEG}),
    Case("corrupt-jpg-coco-in-dataloader-worker", corrupt_image_in_coco_eval,
         ("{ds}/images/val/000001.jpg: not a readable image",), absent=("DataLoader worker",)),
    Case("label-class-out-of-range", detect_eval,
         ("{ds}/labels/val/000000.txt:1: class must be an integer in 0..3, found 7",),
         files={"ds/labels/val/000000.txt": "7 0.5 0.5 0.2 0.2\n"}),
    Case("label-not-finite", detect_eval,
         ("{ds}/labels/val/000000.txt:2: expected finite numbers, found '1 nan 0.5 0.2 0.2'",),
         files={"ds/labels/val/000000.txt": "0 0.5 0.5 0.2 0.2\n1 nan 0.5 0.2 0.2\n"}),
    Case("label-missing-values", detect_eval,
         ("{ds}/labels/val/000000.txt:1: expected 'class cx cy w h'", "found 4 values"),
         files={"ds/labels/val/000000.txt": "0 0.5 0.5 0.2\n"}),
    Case("labels-in-pixel-coordinates", detect_eval,
         ("{data}: split 'val': every one of its 2 label lines has coordinates outside [0, 1]",
          "expected cx cy w h normalised", "e.g. {ds}/labels/val/000000.txt:1: '0 48 40 20 30'"),
         files={"ds/labels/val/000000.txt": "0 48 40 20 30\n", "ds/labels/val/000001.txt": "2 60 50 10 12\n"}),
    Case("coco-annotation-for-missing-image-id",
         lambda ws: detect_eval(ws, coco=ws.coco_json(lambda gt: gt["annotations"][0].update(image_id=999))),
         ("{root}/instances.json: annotations refer to image ids not in 'images': [999]",)),
    Case("coco-image-file-missing",
         lambda ws: detect_eval(ws, coco=ws.coco_json(lambda gt: gt["images"][0].update(file_name="gone.jpg"))),
         ("{root}/instances.json: image id", "{ds}/images/val/gone.jpg: not found")),
    # --- legitimate data: no error
    Case("coco-json-without-info-is-accepted",
         lambda ws: detect_eval(ws, coco=ws.coco_json(lambda gt: [gt.pop("info"), gt.pop("licenses")])),
         (), code=0, absent=("error", "warning"), stdout=("eval: 2 images", "metrics written to")),
    Case("empty-and-missing-label-files-are-background-images", detect_eval,
         ("warning: {data}: split 'val': its 1 label file(s) list no object; all 2 images are used as images "
          "without objects (COCO's mAP of them is -1, undefined)",), code=0,     # a split of nothing to find
         absent=("error",), stdout=("eval: 2 images", "metrics written to"),
         files={"ds/labels/val/000000.txt": "", "ds/labels/val/000001.txt": None}),
    Case("no-label-file-in-a-split-warns", detect_eval,
         ("warning: {data}: split 'val': none of its 2 images has a label file",
          "expected e.g. {ds}/labels/val/000000.txt"), code=0, absent=("error",),
         files={"ds/labels/val/000000.txt": None, "ds/labels/val/000001.txt": None}),
    Case("label-outside-the-image-warns", detect_eval,
         ("warning: {data}: split 'val': 1 of 3 label lines has coordinates outside [0, 1]",
          "{ds}/labels/val/000000.txt:2: '1 1.3 0.5 0.2 0.2'"), code=0, absent=("error",),
         files={"ds/labels/val/000000.txt": "0 0.5 0.5 0.2 0.2\n1 1.3 0.5 0.2 0.2\n",
                "ds/labels/val/000001.txt": "3 0.4 0.4 0.3 0.3\n"}),
    # --- settings
    Case("detect-prune-sparsity-1", lambda ws: detect_prune(ws, "--sparsity", "1.0"),
         ("sparsity must be in [0, 1)", "got 1.0")),
    Case("detect-prune-sparsity-negative", lambda ws: detect_prune(ws, "--sparsity", "-0.1"),
         ("sparsity must be in [0, 1)", "got -0.1")),
    Case("classify-prune-sparsity-1.5",
         lambda ws: ["classify", "prune", "--model", "lenet5", "--data", str(ws.root), "--sparsity", "1.5"],
         ("argument --sparsity: must be in [0, 1)", "found 1.5")),
    Case("data-yaml-not-utf8",        # found by a review: Python's decoding error named no file
         lambda ws: detect_eval(ws, "--data", str(ws.write("ds/latin1.yaml", b"train: images/train\nval: images/val\n"
                                                            b"names: [caf\xe9, b, c, d]\n"))),
         ("{ds}/latin1.yaml:3: expected UTF-8 text, found the byte 0xe9, which is not",)),
    Case("label-file-not-utf8", lambda ws: detect_eval(ws),
         ("{ds}/labels/val/000000.txt:2: expected UTF-8 text, found the byte 0xff",),
         files={"ds/labels/val/000000.txt": b"0 0.5 0.5 0.2 0.2\n\xff\n"}),
    Case("train-momentum-1.5", lambda ws: detect_train(ws, "--momentum", "1.5"),   # found by a review: it trained
         ("--momentum must be in [0, 1), found 1.5",)),
    Case("train-weight-decay-negative", lambda ws: detect_train(ws, "--weight-decay", "-1"),
         ("--weight-decay must be a finite number >= 0, found -1.0",)),
    Case("train-mosaic-1.5", lambda ws: detect_train(ws, "--mosaic", "1.5"),
         ("--mosaic must be a probability in [0, 1], found 1.5",)),
    Case("data-yaml-missing", lambda ws: detect_eval(ws, "--data", str(ws.root / "nope.yaml")),
         ("{root}/nope.yaml: expected a text file, found nothing",)),
    Case("train-burn-in-negative", lambda ws: detect_train(ws, "--burn-in", "-1"),
         ("--burn-in must be >= 0, found -1",)),
    Case("img-size-not-multiple-of-32", lambda ws: detect_train(ws, "--img-size", "100"),
         ("argument --img-size: must be a positive multiple of 32", "found 100")),
    Case("img-size-a-cfg-of-inexact-downsampling-cannot-take",      # 100 -> 50 -> 25 -> 13 -> 7: only 100 tiles
         lambda ws: detect_eval(ws, "--img-size", "128", cfg=ws.write("big.cfg", TINY_CFG.replace(
             "width=64\nheight=64", "width=100\nheight=100"))),
         ("{root}/big.cfg: the network input would be 128x128; expected the cfg's 100x100 (its downsampling "
          "divides no other size evenly)", "--img-size")),
    Case("a-cfg-of-inexact-downsampling-runs-at-its-own-size",
         lambda ws: detect_eval(ws, cfg=ws.write("big.cfg", TINY_CFG.replace("width=64\nheight=64",
                                                                            "width=100\nheight=100"))),
         (), code=0, absent=("error",), stdout=("eval: 2 images", "metrics written to")),
    # --- failures
    Case("non-finite-loss-from-a-huge-lr", lambda ws: detect_train(ws, "--lr", "1e12"),
         ("non-finite loss (", "at epoch 1, batch 1", "last good checkpoint: none was written", "--lr")),
    Case("non-finite-loss-keeps-the-last-good-checkpoint", lambda ws: detect_train(ws, epochs=2),
         ("non-finite loss (nan) at epoch 2", "last good checkpoint: {out}/epoch_0001.pt", "--lr"),
         patch=loss_patch(FIRST_CALL_OF_EPOCH_2, nan_loss), then=epoch_1_checkpoint_kept),
    Case("cuda-out-of-memory", lambda ws: detect_train(ws),
         ("out of memory (CUDA out of memory. Tried to allocate 9.00 GiB)", "smaller --batch-size"),
         patch=loss_patch(1, raise_(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")))),
    Case("cpu-out-of-memory", lambda ws: detect_train(ws),
         ("out of memory", "DefaultCPUAllocator: can't allocate memory", "smaller --batch-size"),
         patch=loss_patch(1, raise_(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                 "allocate 9663676416 bytes.")))),
    Case("unwritable-out-train", lambda ws: detect_train(ws, out=ws.out / "metrics.json" / "run"),
         ("--out {out}/metrics.json/run: cannot create this output folder",
          "expected a folder at {out}/metrics.json, found a file")),
    Case("unwritable-json-out-eval", lambda ws: detect_eval(ws, json_out=ws.out / "tiny.weights" / "m.json"),
         ("--json-out {out}/tiny.weights/m.json: its folder {out}/tiny.weights: cannot create",
          "expected a folder at {out}/tiny.weights, found a file")),
    Case("unwritable-out-prune", lambda ws: detect_prune(ws, out=ws.out / "metrics.json" / "prune"),
         ("--out {out}/metrics.json/prune: cannot create this output folder", "found a file")),
    Case("out-holds-another-run",
         lambda ws: [earlier_run(ws, "--lr", "0.01"), detect_train(ws, "--lr", "0.02")][1],
         ("--out {out}: expected a new folder or one of a run with the same settings",
          "the checkpoints (epoch_0001.pt) of a run with other settings (--lr 0.01 -> 0.02)",
          "--resume {out}")),
    Case("same-command-resumes-with-no-progress-and-an-old-args-json",     # found by a review: refused
         lambda ws: [earlier_run(ws), _without_progress(ws.out / "args.json"),
                     detect_train(ws, "--no-progress", epochs=2)][2],
         (), code=0, absent=("error",), stdout=("resuming from", "epoch_0001.pt", "done: 2 epochs")),
    Case("a-copied-run-folder-resumes-where-it-is",                   # found by a review: refused (--out changed)
         lambda ws: [earlier_run(ws),
                     shutil.copytree(ws.out, ws.root / "copy", ignore=shutil.ignore_patterns("*.lock")),
                     detect_train(ws, out=ws.root / "copy", epochs=2)][2],
         (), code=0, absent=("error",), stdout=("resuming from", "epoch_0001.pt", "done: 2 epochs")),
    Case("resume-with-another-cfg",
         lambda ws: [earlier_run(ws), other_model_weights(ws),
                     [str(ws.root / "other.cfg") if arg == str(ws.cfg) else arg
                      for arg in detect_train(ws, "--resume", str(ws.out), out=ws.root / "other-run")]][2],
         ("--resume {out}: its run had other settings (--cfg '{cfg}' -> '{root}/other.cfg')",)),
    Case("resume-a-bare-checkpoint-with-another-cfg",              # no args.json beside it to compare with
         lambda ws: [earlier_run(ws), (ws.out / "args.json").unlink(), other_model_weights(ws),
                     [str(ws.root / "other.cfg") if arg == str(ws.cfg) else arg
                      for arg in detect_train(ws, "--resume", str(ws.out), out=ws.root / "other-run")]][3],
         ("{out}/epoch_0001.pt: the checkpoint's weights do not fit the model being trained: size mismatch for "
          "layers.0.conv.weight: [8, 3, 3, 3] in the checkpoint, [12, 3, 3, 3] in the model; ", "(and 4 more)"),
         absent=("Missing key(s)",)),
    Case("export-int8-without-an-archive",         # found by a review: ignored, silently
         lambda ws: ["detect", "export", "--cfg", str(ws.cfg), "--weights", str(ws.weights), "--formats", "onnx",
                     "--int8", "--out", str(ws.out / "int8")],
         ("--int8 applies to the compact archive only, and --formats onnx writes none",)),
    Case("export-checkpoint-of-another-cfg",
         lambda ws: [earlier_run(ws), other_model_weights(ws),
                     ["detect", "export", "--cfg", str(ws.root / "other.cfg"), "--checkpoint", str(ws.out),
                      "--formats", "compact", "--out", str(ws.root / "export")]][2],
         ("{out}: its model does not fit {root}/other.cfg: size mismatch for",)),
    # --- outputs that are inputs: found by a review, each replaced the user's file
    Case("train-out-holds-its-weights", lambda ws: detect_train(ws, "--weights", str(ws.out / "tiny.weights")),
         ("--out {out}: this run would overwrite its own input {out}/tiny.weights (--weights)",)),
    Case("prune-out-holds-its-job-file", lambda ws: detect_prune(ws, "--config", str(ws.out / "prune" / "config.yaml")),
         ("--out {out}/prune: holds a config.yaml that no run wrote (it records no 'processes'), which this run "
          "would replace",),
         files={"out/prune/config.yaml": "# the user's job\nsparsity: [0.5]\n"}, then=a_runs_own_config_resumes_it),
    Case("prune-out-holds-a-users-config", detect_prune,
         ("--out {out}/prune: holds a config.yaml that no run wrote (it records no 'processes'), which this run "
          "would replace",), files={"out/prune/config.yaml": "# the user's notes\n"}),
    Case("export-over-files-no-export-wrote",
         lambda ws: ["detect", "export", "--cfg", str(ws.cfg), "--weights", str(ws.weights), "--formats", "onnx",
                     "--out", str(ws.out / "export")],
         ("--out {out}/export: expected a new folder or one an earlier detect export wrote into (its export.json "
          "is not there), found 1 file that this export would replace (model.onnx); choose another --out",),
         files={"out/export/model.onnx": "the user's"}),
    Case("train-resume-from-nothing", lambda ws: detect_train(ws, "--resume", str(ws.root / "nowhere")),
         ("--resume {root}/nowhere: expected a checkpoint file or a folder of them, found nothing",),
         absent=("burn_in",)),       # found by a review: said after the data was read and the warnings given
    Case("train-from-a-pruned-model", lambda ws: detect_train(ws, "--weights", str(pruned_weights(ws))),
         ("--weights {root}/pruned.weights: 50.0% of its conv weights are zero (a pruned model?); detect train does "
          "not keep them at zero, so the model it writes is dense again",), code=0),
    Case("unwritable-out-export",
         lambda ws: ["detect", "export", "--cfg", str(ws.cfg), "--weights", str(ws.weights), "--formats", "compact",
                     "--out", str(ws.out / "metrics.json" / "export")],
         ("--out {out}/metrics.json/export: cannot create this output folder",
          "expected a folder at {out}/metrics.json, found a file"),
         files={"out/metrics.json": "{}"}),
    Case("opencv-without-darknet-importer", lambda ws: detect_prune(ws, "--export", "darknet,onnx"),
         ("checking a Darknet export needs OpenCV 4.x's Darknet importer (cv2.dnn.readNetFromDarknet)",
          "install opencv-python<5", "leave 'darknet' out of the export formats"),
         patch=lambda patch: patch.delattr(cv2.dnn, "readNetFromDarknet", raising=False), then=refused_before_any_stage),
    Case("ctrl-c-in-detect-train", lambda ws: detect_train(ws, epochs=2),
         ("interrupted: the checkpoints so far are kept in {out} (newest: epoch_0001.pt)",
          "run the same command again to resume"), code=130,
         patch=loss_patch(FIRST_CALL_OF_EPOCH_2, raise_(KeyboardInterrupt())),
         then=train_resumes_with_the_same_command),
    Case("ctrl-c-in-detect-prune", detect_prune,
         ("interrupted: the finished stages and the checkpoints so far are kept in {out}/prune",
          "run the same command again to resume"), code=130,
         patch=loss_patch(FIRST_CALL_OF_EPOCH_2, raise_(KeyboardInterrupt())),
         then=prune_resumes_with_the_same_command),
]


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file below `folder` and its bytes, but the run-folder lock file: a run that took the
    lock and then refused its settings rewrote the holder's description in it, which is right (the
    flaky failure of out-holds-another-run: the time in it changed when the first run took a second)."""
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != LOCK_FILE}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_a_clear_error_and_loses_nothing(case: Case, base: Path, tmp_path: Path, capsys,
                                                        monkeypatch):
    monkeypatch.delenv("YOLO_ADMM_DEBUG", raising=False)
    assert all(isinstance(texts, tuple) for texts in (case.expect, case.absent, case.stdout))   # not one string
    ws = Workspace.create(tmp_path, base)
    for relative, content in case.files.items():
        ws.write(relative, content)
    argv = case.argv(ws)
    before = snapshot(ws.out)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        if case.patch is not None:
            case.patch(patch)
        code = main(argv)
    captured = capsys.readouterr()
    assert code == case.code, captured.err
    assert "Traceback" not in captured.err + captured.out
    for expected in case.expect:
        assert expected.format(**ws.names()) in captured.err, captured.err
    for unexpected in case.absent:
        assert unexpected not in captured.err, captured.err
    for expected in case.stdout:
        assert expected in captured.out, captured.out
    if case.code != 0:
        assert snapshot(ws.out).items() >= before.items(), "a file written before the run was changed or removed"
    assert not [p for p in ws.out.rglob("*.tmp")], "a temporary file was left behind"
    if case.then is not None:
        case.then(ws, argv, capsys)


def test_a_resume_may_spell_its_paths_otherwise(base: Path, tmp_path: Path, capsys, monkeypatch):
    """Found by a review: the same run given its cfg once as an absolute and once as a relative path
    was refused as a run with other settings, in detect train and detect prune."""
    ws = Workspace.create(tmp_path, base)
    assert main(detect_train(ws, out=ws.out / "train")) == 0
    assert main(detect_prune(ws)) == 0
    monkeypatch.chdir(ws.root)
    capsys.readouterr()
    relative = [["tiny.cfg" if arg == str(ws.cfg) else arg for arg in argv]
                for argv in (detect_train(ws, out=ws.out / "train"), detect_prune(ws))]
    assert main(relative[0]) == 0 and "resuming from" in capsys.readouterr().out
    assert main(relative[1]) == 0
    assert main(detect_prune(ws, "--lr", "0.5")) == 2
    assert "other settings (lr: not given -> 0.5)" in capsys.readouterr().err        # and a real change is refused


def test_the_command_without_a_task_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: yolo-admm TASK MODE" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "usage: yolo-admm TASK MODE" in capsys.readouterr().out


def test_the_command_says_its_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"yolo-admm {version('yolo-admm')}\n"


def test_a_refused_export_predict_or_prune_leaves_no_empty_folder(base: Path, tmp_path: Path):
    ws = Workspace.create(tmp_path, base)
    junk = ws.write("junk.pt", b"not a checkpoint")
    assert main(["detect", "export", "--cfg", str(ws.cfg), "--checkpoint", str(junk), "--out", str(tmp_path / "e")]) == 2
    assert main(["detect", "predict", "--cfg", str(ws.cfg), "--weights", str(junk), str(ws.ds / "images" / "val"),
                 "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()
    selu = ws.write("selu.cfg", ws.cfg.read_text().replace("activation=leaky", "activation=selu", 1))
    assert main(["detect", "export", "--cfg", str(selu), "--weights", str(ws.weights), "--formats", "darknet",
                 "--out", str(tmp_path / "e")]) == 2                  # found by a review: left an empty folder
    assert not (tmp_path / "e").exists()
    for refused in (["--include", "re:(conv"], ["--exclude", "*"],     # not a regex; leaves nothing to prune
                    ["--cfg", str(selu), "--export", "darknet"],      # an export OpenCV 4 could not check
                    ["--data", str(ws.root / "nowhere.yaml")],         # found by a review: a run folder was
                    ["--weights", str(ws.root / "nowhere.weights")]):  # made, with config.yaml, log.txt, lock
        assert main(detect_prune(ws, *refused, out=tmp_path / "q")) == 2
        assert not (tmp_path / "q").exists()


def test_the_version_is_known_without_installing(monkeypatch, capsys):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)        # as scripts/prune_yolo.sh may run it
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("yolo-admm 0.")


def test_a_resume_with_another_number_of_processes_is_refused(base: Path, tmp_path: Path, capsys, monkeypatch):
    """Found by a torchrun review: a detect prune resumed by one process instead of two counted the
    optimizer steps anew and made 2 ADMM updates of 3; detect train shifted its LR schedule."""
    ws = Workspace.create(tmp_path, base)
    assert main(detect_train(ws, out=ws.out / "train")) == 0
    assert main(detect_prune(ws)) == 0
    for record in (ws.out / "train" / "args.json", ws.out / "prune" / "config.yaml"):
        assert '"processes": 1' in record.read_text() or "processes: 1" in record.read_text()
        record.write_text(record.read_text().replace('"processes": 1', '"processes": 2')
                          .replace("processes: 1", "processes: 2"))       # as a 2-process run writes it
    capsys.readouterr()
    assert main(detect_train(ws, out=ws.out / "train")) == 2
    refusal = capsys.readouterr().err
    assert "other settings (torchrun --nproc_per_node 2 -> 1); choose another --out\n" in refusal   # no --resume hint
    train = ws.out / "train"            # found by a review: an explicit --resume continued with any settings
    assert main(detect_train(ws, "--resume", str(train), out=train, epochs=2)) == 2
    assert (f"--resume {train}: its run had other settings (torchrun --nproc_per_node 2 -> 1); resume it with as "
            f"many processes as it ran with") in capsys.readouterr().err          # found by a review: --processes
    assert main(detect_train(ws, "--resume", str(train / "epoch_0001.pt"), "--batch-size", "1",
                             out=ws.out / "elsewhere", epochs=2)) == 2
    assert "its run had other settings (--batch-size 2 -> 1; torchrun --nproc_per_node 2 -> 1)" in \
        capsys.readouterr().err
    (train / "args.json").write_text((train / "args.json").read_text().replace('"processes": 2', '"processes": 1'))
    assert main(detect_train(ws, "--resume", str(train), "--lr", "0.001", out=train, epochs=2)) == 0   # on purpose
    assert main(detect_prune(ws)) == 2
    assert (f"config.yaml: this run folder holds a run of 2 processes, and this command runs 1 (they set its "
            f"optimizer steps); resume it with torchrun --nproc_per_node 2, or export a finished sparsity in one "
            f"process with detect export --checkpoint {ws.out / 'prune'}/sparsity_S/retrained.pt") in \
        capsys.readouterr().err
    config = ws.out / "prune" / "config.yaml"                             # still usable as a --config
    assert main(["detect", "prune", "--config", str(config), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    import yolo_admm.cli

    monkeypatch.setattr(yolo_admm.cli, "is_rank0", lambda: False)   # found by a review: every rank said it
    capsys.readouterr()
    assert main(detect_prune(ws)) == 2 and capsys.readouterr().err == ""
    assert main(detect_train(ws, "--resume", str(train), "--batch-size", "1", out=train, epochs=3)) == 2
    assert capsys.readouterr().err == ""


def test_torchrun_stops_are_one_line_each(monkeypatch, capsys):
    """Found by a torchrun review: torchrun passes a Ctrl-C on and sends SIGTERM at once, which
    killed the ranks without the resume hint; every rank printed 'interrupted'; and the rank whose
    peer died printed the process group's 40-line traceback."""
    import sys
    import types

    import torch.distributed as dist

    from yolo_admm import cli

    fake = types.ModuleType("fake_task")
    monkeypatch.setitem(sys.modules, "fake_task", fake)
    monkeypatch.setitem(cli.TASKS, "fake", ("fake_task", "a task for this test"))
    fake.main = lambda argv: os.kill(os.getpid(), signal.SIGTERM) or 0
    before = signal.getsignal(signal.SIGTERM)
    assert main(["fake"]) == 130
    assert capsys.readouterr().err == "yolo-admm fake: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) == before                     # put back when the task ends
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["fake"]) == 130 and capsys.readouterr().err == ""          # rank 0 alone says so

    def peer_gone(argv):
        raise dist.DistBackendError("[../third_party/gloo/...] Connection closed by peer [127.0.0.1]:29500\nmore")
    fake.main = peer_gone
    assert main(["fake"]) == 2
    assert capsys.readouterr().err == ("yolo-admm fake: error (rank 1): another process of this run stopped ([../"
                                       "third_party/gloo/...] Connection closed by peer [127.0.0.1]:29500); its own "
                                       "message says why\n")


def test_ctrl_c_while_the_task_is_imported_is_one_line(capsys, monkeypatch):
    """Found by a fuzz: a Ctrl-C in the first second or so (importing torch) printed a traceback."""
    import importlib

    def interrupted(name):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["detect", "eval", "--help"]) == 130
    assert capsys.readouterr().err == "yolo-admm detect: interrupted\n"


def test_ctrl_c_while_the_task_is_imported_waits_for_the_import(tmp_path, monkeypatch, capsys):
    """Found by a fuzz of early Ctrl-Cs: raised inside the import, one left numpy half-imported
    (RecursionError, exit 1) or the process killed by SIGINT after its "interrupted" line."""
    import sys

    import yolo_admm.cli

    (tmp_path / "interrupting_task.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nIMPORTED_WHOLE = True\n"
        "def main(argv):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(yolo_admm.cli.TASKS, "interrupting", ("interrupting_task", "a task whose import is cut"))
    monkeypatch.delitem(sys.modules, "interrupting_task", raising=False)
    # Ctrl-C as an interactive Python takes it, whatever the suite inherited: a suite started in the
    # background by a script (`&`) inherits SIGINT ignored, and an ignored Ctrl-C stays ignored (below).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["interrupting"]) == 130                             # the task itself never ran
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # Ctrl-C as before
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert capsys.readouterr().err == "yolo-admm interrupting: interrupted\n"
    assert sys.modules.pop("interrupting_task").IMPORTED_WHOLE             # the import went on to its end



def test_holding_interrupts_through_the_import_keeps_an_ignored_ctrl_c_ignored_and_works_in_a_thread(
        tmp_path, monkeypatch, capsys):
    """Found by a review: the hold made a job whose SIGINT is ignored (started with `&` by a script)
    stop at a Ctrl-C during its import, and made main() fail outside the main thread."""
    import sys
    import threading

    import yolo_admm.cli

    (tmp_path / "interrupting_task.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\ndef main(argv):\n    return 0\n")
    (tmp_path / "quiet_task.py").write_text("def main(argv):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(yolo_admm.cli.TASKS, "interrupting", ("interrupting_task", "a task whose import is cut"))
    monkeypatch.setitem(yolo_admm.cli.TASKS, "quiet", ("quiet_task", "a task"))
    for name in ("interrupting_task", "quiet_task"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["interrupting"]) == 0                                   # ignored, as it was asked to be
    finally:
        signal.signal(signal.SIGINT, previous)
    results = []
    thread = threading.Thread(target=lambda: results.append(main(["quiet"])))
    thread.start()
    thread.join()
    assert results == [0]


_CTRL_C_AT_FORK = {"hooks": False, "armed": False}


def _ctrl_c_if_armed() -> None:
    """An at-fork hook (in the parent, after the fork) that, once armed, sends this process SIGINT:
    Python raises KeyboardInterrupt in the hook itself, as it does in logging's `_releaseLock` when
    a Ctrl-C lands while a DataLoader forks its workers."""
    if _CTRL_C_AT_FORK["armed"]:
        _CTRL_C_AT_FORK["armed"] = False
        signal.raise_signal(signal.SIGINT)


def test_ctrl_c_during_a_fork_is_not_lost(monkeypatch, capsys):
    """Found by a fuzz (scripts/interrupt_fuzz.py): about one Ctrl-C in 20 sent to a training job
    was lost: raised inside an at-fork hook, which os.fork reports ("Exception ignored in ...") and
    goes on, and the job trained on."""
    import sys
    import threading
    import types

    from yolo_admm import cli

    if not _CTRL_C_AT_FORK["hooks"]:                   # once per process: at-fork hooks cannot be removed
        os.register_at_fork(after_in_parent=_ctrl_c_if_armed)
        _CTRL_C_AT_FORK["hooks"] = True
    children = []

    def fork_then_work(argv):
        _CTRL_C_AT_FORK["armed"] = True
        child = os.fork()
        if child == 0:
            os._exit(0)
        children.append(child)
        deadline = time.monotonic() + 5                 # the task's work: the interrupt lands here, at once
        while time.monotonic() < deadline:
            time.sleep(0.001)
        return 0

    fake = types.ModuleType("fake_task")
    fake.main = fork_then_work
    monkeypatch.setitem(sys.modules, "fake_task", fake)
    monkeypatch.setitem(cli.TASKS, "fake", ("fake_task", "a task for this test"))
    hook = sys.unraisablehook
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)   # as run in a terminal: not ignored
    try:
        assert main(["fake"]) == 130
        assert capsys.readouterr().err == "yolo-admm fake: interrupted\n"
        assert sys.unraisablehook is hook and "raise-interrupts-again" not in {t.name for t in threading.enumerate()}
    finally:
        signal.signal(signal.SIGINT, sigint)
        for child in children:
            os.waitpid(child, 0)


def test_a_swallowed_ctrl_c_is_not_raised_again_after_a_newer_interrupt(monkeypatch, capsys):
    """Found by a review: torchrun's SIGTERM (or a second Ctrl-C) right after a swallowed Ctrl-C was
    followed by that Ctrl-C raised again, inside the task's own interrupt handling: the resume hint
    was lost. And one raised again just as a task ended escaped main() as a traceback."""
    import sys
    import types

    from yolo_admm import cli

    class SwallowsACtrlC:
        def __del__(self):                               # as an at-fork hook or a weakref callback does
            signal.raise_signal(signal.SIGINT)

    def task(argv):
        try:
            SwallowsACtrlC()                             # freed at once: the interrupt is only reported
            signal.raise_signal(signal.SIGTERM)          # and then raised for real
        except KeyboardInterrupt:
            time.sleep(0.05)                             # the task says what it kept
            raise KeyboardInterrupt("the checkpoints so far are kept; run again to resume") from None
        return 0

    def ends_at_once(argv):
        SwallowsACtrlC()
        return 0

    fake = types.ModuleType("fake_task")
    monkeypatch.setitem(sys.modules, "fake_task", fake)
    monkeypatch.setitem(cli.TASKS, "fake", ("fake_task", "a task for this test"))
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fake.main = task
        assert main(["fake"]) == 130
        assert capsys.readouterr().err == "yolo-admm fake: interrupted: the checkpoints so far are kept; run again to resume\n"
        fake.main = ends_at_once
        assert all(main(["fake"]) in (0, 130) for _ in range(20))    # never a KeyboardInterrupt out of main()
        time.sleep(0.05)                                              # nor one left pending
    finally:
        signal.signal(signal.SIGINT, sigint)


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt (Python's default handler), whatever pytest was started with."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_held_ctrl_c_stops_the_block_after_it_and_a_second_one_at_once(ctrl_c_as_in_a_terminal):
    from engine import held_interrupts

    ran = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            signal.raise_signal(signal.SIGINT)
            ran.append("the rest of the block")
    assert ran == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            signal.raise_signal(signal.SIGINT)
            ran.append("after the first")
            signal.raise_signal(signal.SIGINT)             # asked again: a block that hangs can be stopped
            ran.append("after the second")
    assert ran[1:] == ["after the first"]

    calls = []
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with held_interrupts():
            signal.raise_signal(signal.SIGTERM)
            ran.append("SIGTERM held")
            assert calls == []
        assert calls == [signal.SIGTERM] and ran[-1] == "SIGTERM held"
    finally:
        signal.signal(signal.SIGTERM, previous_term)

    signal.signal(signal.SIGINT, signal.SIG_IGN)              # a job started with `&`: stays ignored
    with held_interrupts():
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    errors = []

    def in_a_thread():
        try:
            with held_interrupts():
                ran.append("in a thread")
        except BaseException as error:                        # signal.signal refuses other threads
            errors.append(error)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert errors == [] and ran[-1] == "in a thread"


def test_the_trainer_stops_at_a_ctrl_c_while_its_data_loader_forks(ctrl_c_as_in_a_terminal, monkeypatch):
    """The training loop goes through `held_iteration`: the Ctrl-C stops it before its first step."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from engine import TrainConfig, Trainer

    if not _CTRL_C_AT_FORK["hooks"]:
        os.register_at_fork(after_in_parent=_ctrl_c_if_armed)
        _CTRL_C_AT_FORK["hooks"] = True
    ignored, steps = [], []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    model = nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4, num_workers=2)

    def loss(module, batch):
        steps.append(1)
        return module(batch[0]).square().mean(), {}

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, loader,
                      TrainConfig(epochs=1, device="cpu", progress=False))
    _CTRL_C_AT_FORK["armed"] = True
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        _CTRL_C_AT_FORK["armed"] = False
    assert steps == [] and ignored == []


def test_a_held_ctrl_c_is_acted_on_when_the_block_fails_or_lands_while_the_handlers_are_put_back(
        ctrl_c_as_in_a_terminal, monkeypatch):
    """Found by a review: a terminal's Ctrl-C also stops the DataLoader's workers, the block then
    fails (torch: "worker exited unexpectedly") and the held Ctrl-C was dropped (exit 1, not 130).
    And a Ctrl-C handled while the handlers were put back left SIGTERM's hold installed."""
    from engine import held_interrupts

    with pytest.raises(KeyboardInterrupt) as raised:
        with held_interrupts():
            signal.raise_signal(signal.SIGINT)
            raise RuntimeError("DataLoader worker (pid 1) exited unexpectedly")
    assert isinstance(raised.value.__context__, RuntimeError)

    real_signal, pending = signal.signal, [signal.SIGINT]

    def lands_while_put_back(number, handler):
        if handler is signal.default_int_handler and pending:   # Python runs a pending handler first
            pending.clear()
            raise KeyboardInterrupt
        return real_signal(number, handler)

    term = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        monkeypatch.setattr(signal, "signal", lands_while_put_back)
        with pytest.raises(KeyboardInterrupt):
            with held_interrupts():
                pass
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"      # not the hold
    finally:
        signal.signal(signal.SIGTERM, term)


def test_the_import_hold_puts_every_handler_back_when_a_ctrl_c_lands_meanwhile(ctrl_c_as_in_a_terminal,
                                                                              monkeypatch):
    """As in `engine.interrupts` (found by a review there): a handler left behind by the import hold
    would have swallowed every later SIGTERM of the run."""
    from yolo_admm.cli import _import_holding_interrupts

    real_signal, pending = signal.signal, [signal.SIGINT]

    def lands_while_put_back(number, handler):
        if handler is signal.default_int_handler and pending:
            pending.clear()
            raise KeyboardInterrupt
        return real_signal(number, handler)

    def on_sigterm(signum, frame):
        pass

    term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        monkeypatch.setattr(signal, "signal", lands_while_put_back)
        with pytest.raises(KeyboardInterrupt):
            _import_holding_interrupts("json")
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is on_sigterm                   # not the hold's
    finally:
        signal.signal(signal.SIGTERM, term)


def test_held_iteration_holds_the_start_and_the_end_not_the_wait_for_an_item(ctrl_c_as_in_a_terminal):
    """Found by a review: holding every fetch made a Ctrl-C (or a scheduler's SIGTERM) wait for the
    next batch, and forever behind a hung worker."""
    from engine import held_iteration

    class Items:
        def __init__(self):
            self.reached = []

        def __len__(self):
            return 3

        def __iter__(self):
            for index in range(3):
                if index == 1:
                    signal.raise_signal(signal.SIGINT)            # while the second item is made
                    self.reached.append("after the signal")
                yield index

    items, fetched = Items(), []
    with pytest.raises(KeyboardInterrupt):
        for item in held_iteration(items):
            fetched.append(item)
    assert fetched == [0] and items.reached == []                 # at once, not after the item


def test_ctrl_c_while_a_data_loader_forks_its_workers_stops_the_loop(ctrl_c_as_in_a_terminal, monkeypatch):
    """Found by `scripts/interrupt_fuzz.py --early`: a Ctrl-C as a DataLoader started or stopped its
    workers was lost (raised inside an at-fork hook, or in multiprocessing between a fork and its
    bookkeeping) or ended the process by SIGINT after the task had stopped. Held over those calls,
    it stops the loop before its first batch, and nothing is reported as ignored."""
    from torch.utils.data import DataLoader, TensorDataset

    from engine import held_iteration

    if not _CTRL_C_AT_FORK["hooks"]:
        os.register_at_fork(after_in_parent=_ctrl_c_if_armed)
        _CTRL_C_AT_FORK["hooks"] = True
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2, num_workers=2)
    batches = []
    _CTRL_C_AT_FORK["armed"] = True
    try:
        with pytest.raises(KeyboardInterrupt):
            for batch in held_iteration(loader):
                batches.append(batch)
    finally:
        _CTRL_C_AT_FORK["armed"] = False
    assert batches == [] and ignored == []
    assert [float(batch[0].sum()) for batch in held_iteration(loader)] == [1.0, 5.0, 9.0, 13.0]   # and again


def test_a_ctrl_c_that_c_code_drops_is_raised_again(ctrl_c_as_in_a_terminal, monkeypatch, capsys):
    """Found by `scripts/interrupt_fuzz.py --early`: about one Ctrl-C in 80 was dropped without a
    report (C code that clears errors, around Python code it calls) and the job trained on."""
    import types

    from yolo_admm import cli

    monkeypatch.setattr(cli, "RAISE_LOST_INTERRUPT_AFTER_S", 0.2)
    ran = []

    def drops_a_ctrl_c(argv):
        try:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)
        except KeyboardInterrupt:
            pass                                         # as PyErr_Clear() does
        started = time.monotonic()
        try:
            while time.monotonic() - started < 10:       # the task's work
                time.sleep(0.001)
        except KeyboardInterrupt:
            ran.append(time.monotonic() - started)
            raise
        return 0

    fake = types.ModuleType("fake_task")
    fake.main = drops_a_ctrl_c
    monkeypatch.setitem(sys.modules, "fake_task", fake)
    monkeypatch.setitem(cli.TASKS, "fake", ("fake_task", "a task for this test"))
    assert main(["fake"]) == 130
    assert capsys.readouterr().err == "yolo-admm fake: interrupted\n"
    assert len(ran) == 1 and 0.1 < ran[0] < 2


def test_a_handled_ctrl_c_exits_130_under_python_m(tmp_path):
    """Found by `scripts/interrupt_fuzz.py --early`: under `python -m yolo_admm`, a Ctrl-C that had
    ended a string exec (as dataclasses use) left CPython's flag for an unhandled interrupt set,
    and the process killed itself with SIGINT at exit instead of exiting 130."""
    import subprocess

    package = tmp_path / "run_a_task_as_m"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import runpy, sys, types\n"
        "import yolo_admm.cli\n"
        "def task(argv):\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt')\n"
        "    except KeyboardInterrupt:\n"
        "        raise KeyboardInterrupt('stopped') from None\n"
        "sys.modules['fake_task'] = types.ModuleType('fake_task')\n"
        "sys.modules['fake_task'].main = task\n"
        "yolo_admm.cli.TASKS['fake'] = ('fake_task', 'a task for this test')\n"
        "sys.argv = ['yolo-admm', 'fake']\n"
        "runpy.run_module('yolo_admm', run_name='__main__')\n")
    repository = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "run_a_task_as_m"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repository)])})
    assert (done.returncode, done.stderr) == (130, "yolo-admm fake: interrupted: stopped\n")


def test_warnings_print_once_under_torchrun(capsys, monkeypatch):
    """Found by a review: every rank printed each warning (the data loads on every rank)."""
    from yolo_admm.cli import _warning_printer

    show = _warning_printer("classify")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in (("1", ""), ("0", "yolo-admm classify: warning: 3 image(s) in no class folder\n")):
        monkeypatch.setenv("RANK", rank)
        show(UserWarning("3 image(s) in no class folder"), UserWarning, "cifar.py", 42)
        assert capsys.readouterr().err == expected, rank


def test_modes_that_do_not_train_are_refused_under_torchrun_once(capsys, monkeypatch, tmp_path):
    """Found by a review: under torchrun every rank of detect predict and export wrote the same --out
    (a rank removed the other's staging folder; predict refused its peer's files), and eval printed
    its table once per rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    outputs = {"predict": ["--out", str(tmp_path / "predict"), "img.jpg"],
               "export": ["--out", str(tmp_path / "export")],
               "eval": ["--data", "d.yaml", "--json-out", str(tmp_path / "eval" / "m.json")]}
    for mode, rest in outputs.items():
        for rank, expected in (("1", ""), ("0", f"yolo-admm detect: error: detect {mode} runs in one process (it "
                                                f"does not train, and its processes would write the same files): "
                                                f"run it without torchrun\n")):
            monkeypatch.setenv("RANK", rank)
            assert main(["detect", mode, "--weights", "w.yaspars", *rest]) == 2
            assert capsys.readouterr().err == expected, (mode, rank)
        assert not (tmp_path / mode).exists()


def test_under_torchrun_rank_0_alone_prints_argument_errors_and_other_ranks_name_themselves(capsys, monkeypatch):
    """Found by a review: under torchrun every rank printed the same argument error, and errors of
    other ranks did not say which rank they came from."""
    monkeypatch.setenv("RANK", "1")                        # a RANK alone is no torchrun run: it prints
    assert main(["detect", "eval", "--conf"]) == 2 and "expected one argument" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["classify", "prune", "--model", "lenet5", "--data", "d", "--sparsity", "2"],
                 ["detect", "eval", "--conf"]):
        assert main(argv) == 2 and capsys.readouterr().err == "", argv
    assert main(["detect", "eval", "--help"]) == 0 and capsys.readouterr() == ("", "")    # nor its help
    bad_flags = (["detect", "train", "--cfg", "none.cfg", "--data", "d.yaml", "--out", "o", "--batch-size", "0"],
                 ["detect", "prune", "--cfg", "none.cfg", "--data", "d.yaml", "--out", "o", "--rho", "-1"])
    for argv in bad_flags:                     # every rank reads the same flags: rank 0 says it
        assert main(argv) == 2 and capsys.readouterr().err == "", argv
    monkeypatch.setenv("RANK", "0")
    assert main(bad_flags[0]) == 2
    assert capsys.readouterr().err == "yolo-admm detect: error: --batch-size must be >= 1, found 0\n"
    assert main(bad_flags[1]) == 2 and "rho must be > 0.0" in capsys.readouterr().err
    assert main(["classify", "prune", "--model", "lenet5", "--data", "d", "--sparsity", "2"]) == 2
    assert "--sparsity: must be in [0, 1)" in capsys.readouterr().err
