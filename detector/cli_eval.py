"""`yolo-admm detect eval`: COCO box mAP of a Darknet model with pycocotools.

    yolo-admm detect eval --cfg C --weights W --images DIR --annotations instances.json
    yolo-admm detect eval --cfg C --weights W --data data.yaml [--split val]
    yolo-admm detect eval --weights model.yaspars --data data.yaml      (a compact archive: its own cfg)

Prints COCOeval's 12-number table (and per-class AP with --per-class); --json-out writes
map50_95, map50, map75, ap_small, ap_medium, ap_large and images.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from data.eval_dataset import InferenceDataset
from data.sources import DetectionSource, load_coco_json, load_yolo_dataset
from detector.class_checks import check_classes, check_same_classes
from detector.cli import add_model_arguments, load_model, model_num_classes
from detector.evaluate import CONF_THRESH, MAX_DET, NMS_IOU, EvalResult, evaluate
from detector.predict import make_loader
from engine import atomic_write_json, output_file
from yolo_admm.wording import counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    dataset = parser.add_argument_group("dataset (either --images with --annotations, or --data)")
    dataset.add_argument("--images", help="folder of the images a COCO json refers to")
    dataset.add_argument("--annotations", help="COCO instances json (model class i = i-th sorted category id)")
    dataset.add_argument("--data", help="Ultralytics data.yaml with YOLO txt labels")
    dataset.add_argument("--split", default="val", help="split of --data (default: val)")
    parser.add_argument("--conf", type=float, default=CONF_THRESH,
                        help=f"score threshold, objectness x class (default: {CONF_THRESH}, as Darknet's detector map)")
    parser.add_argument("--iou", type=float, default=NMS_IOU, help=f"per-class NMS IoU threshold (default: {NMS_IOU})")
    parser.add_argument("--max-det", type=int, default=MAX_DET,
                        help=f"detections kept per image, 1 to {MAX_DET} (default: {MAX_DET}; COCO's mAP scores "
                             f"the best {MAX_DET} of each image)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader worker processes (default: 0 on CPU, where the forward pass "
                             "already uses every core; min(4, CPU count) on CUDA)")
    parser.add_argument("--per-class", action="store_true", help="also print AP50-95 and AP50 per class")
    parser.add_argument("--json-out", type=Path,
                        help="write the headline metrics to this JSON file: map50_95, map50, map75, ap_small, "
                             "ap_medium, ap_large, images")


def load_source(args: argparse.Namespace) -> DetectionSource:
    """The dataset of --images/--annotations or --data/--split."""
    if args.data and (args.images or args.annotations):
        raise ValueError("give either --data, or --images with --annotations, not both")
    if args.data:
        return load_yolo_dataset(args.data, args.split)
    if not (args.images and args.annotations):
        raise ValueError("a dataset is needed: --images DIR --annotations instances.json, or --data data.yaml")
    return load_coco_json(args.images, args.annotations)


def format_per_class(result: EvalResult) -> str:
    """A table of per-class AP50-95 and AP50."""
    width = max([len(c.name) for c in result.per_class] + [5])
    lines = [f"{'class':<{width}}  AP50-95   AP50"]
    lines += [f"{c.name:<{width}}  {c.ap50_95:7.4f}  {c.ap50:7.4f}" for c in result.per_class]
    return "\n".join(lines)


def default_workers(device: torch.device) -> int:
    """0 on CPU, where the forward pass already has every core (one worker gave no clear gain on the
    2-core CPU, benchmarks/eval_speed.py); min(4, CPU count) on CUDA, where decoding is the bottleneck."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def run(args: argparse.Namespace) -> int:
    for name in ("conf", "iou"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name} must be in [0, 1], found {getattr(args, name)}")
    for flag, value, low in (("--max-det", args.max_det, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, found {value}")
    if args.max_det > MAX_DET:         # pycocotools' summary reads maxDets=100 whatever else is scored
        raise ValueError(f"--max-det must be at most {MAX_DET}, found {args.max_det}: COCO's mAP scores the best "
                         f"{MAX_DET} detections of each image, so more would not count")
    if args.json_out is not None:
        output_file(args.json_out, "--json-out")
    source = load_source(args)
    model, net_w, net_h, letterbox = load_model(args)
    check_classes(args.cfg or args.weights, model_num_classes(model), source)
    check_same_classes(getattr(model, "class_names", None), f"the class names of {args.weights}", source.class_names,
                       str(args.data or args.annotations), reordered_only=True)
    dataset = InferenceDataset.from_source(source, net_w, net_h, letterbox)
    device = next(model.parameters()).device
    workers = default_workers(device) if args.workers is None else args.workers
    loader = make_loader(dataset, args.batch_size, workers, device)
    print(f"eval: {counted(len(dataset), 'image')} at {net_w}x{net_h} ({'letterbox' if letterbox else 'resize'}) on {device}")
    result = evaluate(model, loader, source, args.conf, args.iou, args.max_det, per_class=args.per_class,
                      progress=args.progress)
    print(result.summary)
    if args.per_class:
        print(format_per_class(result))
    if args.json_out:
        atomic_write_json(args.json_out, result.metrics())
        print(f"metrics written to {args.json_out}")
    return 0
