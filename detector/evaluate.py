"""COCO box mAP of a detector with pycocotools.

`evaluate(model, loader, source)` runs the model over a DataLoader of the source's images
(`detector.predict.detect_loader`), collects the detections in COCO result format, and scores them
with `COCOeval` against `source.to_coco()`. `coco_metrics(gt, results)` is the scoring step alone.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from data.eval_dataset import ImageMeta
from data.sources import DetectionSource
from detector.predict import detect_loader

# Darknet's `detector map` settings (validate_detector_map); Darknet has no cap, COCO scores <= 100 per image.
CONF_THRESH = 0.005
NMS_IOU = 0.45
MAX_DET = 100


@dataclass(frozen=True)
class ClassAP:
    """AP of one class (only classes with ground truth get one)."""

    name: str
    category_id: int
    ap50_95: float
    ap50: float


@dataclass(frozen=True)
class EvalResult:
    """COCO box metrics. Values are -1 where COCOeval has nothing to score (no ground truth)."""

    map50_95: float
    map50: float
    map75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    images: int
    stats: tuple[float, ...]          # COCOeval's 12 numbers, in its order
    summary: str                      # COCOeval's 12-line table
    per_class: tuple[ClassAP, ...] | None = None

    def metrics(self) -> dict:
        """The headline numbers (what `detect eval --json-out` writes)."""
        keys = ("map50_95", "map50", "map75", "ap_small", "ap_medium", "ap_large", "images")
        return {k: getattr(self, k) for k in keys}


def to_coco_results(detections: Iterable[tuple[ImageMeta, torch.Tensor]], category_ids: Sequence[int]) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh, score) from (meta, Tensor[M, 6]) pairs
    whose boxes are xyxy in original-image pixels and whose class column holds model class indices."""
    results = []
    for meta, dets in detections:
        if len(dets) and int(dets[:, 5].max()) >= len(category_ids):
            raise ValueError(f"{meta.path}: the model predicted class {int(dets[:, 5].max())} but the dataset "
                             f"has {len(category_ids)} classes")
        for x1, y1, x2, y2, score, cls in dets.tolist():
            results.append({"image_id": meta.image_id, "category_id": category_ids[int(cls)],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results


def coco_metrics(ground_truth: dict, results: list[dict], per_class: bool = False) -> EvalResult:
    """Score COCO `results` against the COCO `ground_truth` dict with COCOeval (bbox)."""
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(results) if results else _empty_results(gt)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    stats = tuple(float(v) for v in evaluator.stats)
    return EvalResult(
        map50_95=stats[0], map50=stats[1], map75=stats[2], ap_small=stats[3], ap_medium=stats[4],
        ap_large=stats[5], images=len(ground_truth["images"]), stats=stats, summary=table.getvalue().rstrip(),
        per_class=_per_class_ap(evaluator, gt) if per_class else None)


def _empty_results(gt: COCO) -> COCO:
    """A result set with no detections (COCO.loadRes cannot take an empty list)."""
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                     "categories": list(gt.dataset["categories"])}
    empty.createIndex()
    return empty


def _per_class_ap(evaluator: COCOeval, gt: COCO) -> tuple[ClassAP, ...]:
    """AP50-95 and AP50 per category (area 'all', 100 detections), for categories with ground truth."""
    precision = evaluator.eval["precision"]  # [T iou thresholds, R recall points, K classes, A areas, M max-dets]
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    per_class = []
    for k, category_id in enumerate(evaluator.params.catIds):
        curve = precision[:, :, k, 0, -1]                       # [T, R]
        if not (curve > -1).any():
            continue
        per_class.append(ClassAP(names[category_id], int(category_id), float(np.mean(curve[curve > -1])),
                                 float(np.mean(curve[0][curve[0] > -1]))))
    return tuple(per_class)


def evaluate(model: torch.nn.Module, loader: DataLoader, source: DetectionSource,
             conf_thresh: float = CONF_THRESH, iou_thresh: float = NMS_IOU, max_det: int = MAX_DET,
             per_class: bool = False, progress: bool = True, device: torch.device | None = None) -> EvalResult:
    """COCO mAP of `model` on `source`, whose images `loader` yields (a DataLoader of
    `data.InferenceDataset.from_source(source, ...)` with `collate_inference`), run on `device`
    (default: the device of the model's parameters).

    Defaults are Darknet's `detector map`: conf 0.005, NMS IoU 0.45; at most 100 detections per image.
    """
    detections = detect_loader(model, loader, conf_thresh, iou_thresh, max_det, progress, device)
    results = to_coco_results(detections, source.category_ids)
    return coco_metrics(source.to_coco(), results, per_class)
