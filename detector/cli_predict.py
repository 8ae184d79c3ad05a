"""`yolo-admm detect predict`: detect objects in images.

    yolo-admm detect predict --cfg C --weights W SOURCE... [--out DIR] [--conf 0.25] [--iou 0.45]

SOURCE is an image file or a folder of images. Writes DIR/<image stem>.jpg with the detections drawn
and DIR/detections.json (per image: path, size, and detections with class, score, xyxy box in
original-image pixels).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from data.eval_dataset import InferenceDataset
from data.sources import IMAGE_SUFFIXES, exif_orientation, parse_class_names
from detector.cli import add_model_arguments, load_model, model_num_classes
from detector.predict import predict
from engine import output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="image files or folders of images")
    parser.add_argument("--out", type=Path, default=Path("runs/predict"), help="output folder (default: runs/predict)")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold, objectness x class (default: 0.25)")
    parser.add_argument("--iou", type=float, default=0.45, help="per-class NMS IoU threshold (default: 0.45)")
    parser.add_argument("--max-det", type=int, default=100, help="detections kept per image (default: 100)")
    parser.add_argument("--names", type=Path,
                        help="class names: a Darknet .names file (one per line) or a data.yaml (default: class indices)")


def collect_images(sources: list[str]) -> list[Path]:
    """Image files named directly, plus the images inside named folders (sorted, not recursive;
    hidden files such as macOS's ._x.jpg left out)."""
    images = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            images += found
        elif source.is_file():
            images.append(source)
        else:
            raise FileNotFoundError(f"{source}: no such image file or folder")
    return images


def read_class_names(path: Path | None, num_classes: int) -> list[str]:
    """Names from a .names file or a data.yaml's `names` (list or dict); indices when `path` is None."""
    if path is None:
        return [str(i) for i in range(num_classes)]
    if path.suffix in (".yaml", ".yml"):
        names = parse_class_names(yaml.safe_load(path.read_text(encoding="utf-8")), path)
    else:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not isinstance(names, list) or len(names) != num_classes:
        raise ValueError(f"{path}: expected {num_classes} class names (the model's classes), "
                         f"found {len(names) if isinstance(names, list) else names!r}")
    return [str(n) for n in names]


def run(args: argparse.Namespace) -> int:
    if not (0 <= args.conf <= 1 and 0 <= args.iou <= 1 and args.max_det >= 1):
        raise ValueError(f"--conf and --iou must be in [0, 1] and --max-det >= 1, found "
                         f"{args.conf}, {args.iou}, {args.max_det}")
    images = collect_images(args.sources)
    model, net_w, net_h, letterbox = load_model(args)
    class_names = read_class_names(args.names, model_num_classes(model))
    output_folder(args.out, "--out")                # after the inputs are known good: no empty folder
    dataset = InferenceDataset(images, None, net_w, net_h, letterbox,
                               [exif_orientation(Path(image)) for image in images])   # photos as displayed
    json_path = predict(model, dataset, args.out, class_names, args.conf, args.iou, args.max_det)
    print(f"predict: {len(images)} images -> {args.out}/ (detections in {json_path})")
    return 0
