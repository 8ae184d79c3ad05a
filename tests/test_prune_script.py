"""`scripts/prune_yolo.sh CFG WEIGHTS COCO_DIR [FLAGS...]`, the real-model path of the main command,
on a COCO 2017 folder layout (images/{train,val}2017, annotations/instances_*.json) made from the
generated shapes, with configs/coco.yaml's settings overridden down to a seconds-long run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.sources import load_yolo_dataset
from data.synthetic import make_shapes_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prune_yolo.sh"
DEMO_CFG = REPO / "detector" / "cfgs" / "demo-tiny.cfg"
DEMO_WEIGHTS = REPO / "detector" / "cfgs" / "demo-tiny.weights"


def write_coco_layout(data_yaml: Path, root: Path) -> Path:
    """Copy a YOLO-txt dataset's train and val splits into COCO 2017's folder layout."""
    for split, coco_split in (("train", "train2017"), ("val", "val2017")):
        source = load_yolo_dataset(data_yaml, split)
        images = root / "images" / coco_split
        images.mkdir(parents=True)
        for record in source.records:
            shutil.copy(record.path, images / record.path.name)
        annotations = root / "annotations" / f"instances_{coco_split}.json"
        annotations.parent.mkdir(exist_ok=True)
        annotations.write_text(json.dumps(source.to_coco()))
    return root


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_prunes_a_given_model_on_a_coco_folder(tmp_path):
    """Paths are given from the caller's folder, outside the repository, and the run folder lands
    there too (a review found the script resolved them against the repository)."""
    data_yaml = make_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=4, img_size=96, seed=5)
    write_coco_layout(data_yaml, tmp_path / "coco")
    shutil.copy(DEMO_CFG, tmp_path / "demo-tiny.cfg")
    flags = ["--sparsity", "0.5", "--admm-iters", "1", "--epochs-per-iter", "1", "--retrain-epochs", "1",
             "--batch-size", "4", "--img-size", "96", "--burn-in", "0", "--workers", "0", "--device", "cpu",
             "--bn-images", "4", "--export", "compact", "--no-progress"]
    completed = subprocess.run(["bash", str(SCRIPT), "demo-tiny.cfg", os.path.relpath(DEMO_WEIGHTS, tmp_path), "coco",
                                *flags], cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable},
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = tmp_path / "runs" / "demo-tiny-coco"

    results = json.loads((out / "results.json").read_text())
    stages = results["sweep"][0]["stages"]
    assert [stage["stage"] for stage in stages] == ["dense", "hard_prune", "retrained"]
    assert stages[-1]["sparsity"] == pytest.approx(0.5, abs=1e-5)
    config = (out / "config.yaml").read_text()
    assert "mosaic: 0.5" in config and "rho: 0.0015" in config       # configs/coco.yaml under the flags
    assert str((tmp_path / "coco" / "annotations" / "instances_val2017.json").resolve()) in config
    assert (out / "sparsity_0.5" / "export" / "pruned.yaspars").stat().st_size > 0   # the compact export


def test_the_script_with_too_few_arguments_says_how_to_call_it():
    completed = subprocess.run(["bash", str(SCRIPT), "yolov4.cfg"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "usage:" in completed.stderr and "CFG WEIGHTS COCO_DIR" in completed.stderr


def test_the_script_has_a_help():
    completed = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and completed.stderr == ""
    assert "offline demo" in completed.stdout and "paths are from the current folder" in completed.stdout
    assert "#" not in completed.stdout and "set -" not in completed.stdout


def test_the_script_without_the_projects_packages_says_so_in_one_line(tmp_path):
    """Found by a review: in a clone without .venv it ran the system python3, which stopped with a
    ModuleNotFoundError traceback."""
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexit 1\n")             # a python that imports nothing
    bare.chmod(0o755)
    completed = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHON": str(bare)})
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().endswith("lacks the project's packages (torch, albumentations, pycocotools); "
                                             "run 'make venv' in " + str(REPO) + " first, or set PYTHON to a python "
                                             "that has them")
    assert subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(bare)}).returncode == 0      # its help needs none
