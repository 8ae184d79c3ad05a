"""`yolo-admm detect predict`: detect objects in images.

    yolo-admm detect predict --cfg C --weights W SOURCE... [--out DIR] [--conf 0.25] [--iou 0.45]
    yolo-admm detect predict --weights model.yaspars SOURCE...    (a compact archive: its own cfg)

SOURCE is an image file or a folder of images (its sub-folders too; hidden files left out). Writes
DIR/<image stem>.jpg with the detections drawn (_1, _2 ... added where stems repeat) and
DIR/detections.json, a list with per image: `image` (its path), `image_id`, `width` and `height`
(as displayed: EXIF orientation applied), `detections` (each `class_id`, `class_name`, `score`,
`box_xyxy` in those displayed pixels) and `annotated` (the drawn file's name). A file that cannot
be opened as an image is left out with a warning, and the JSON is written also when the run stops
early (for the images done). --out may not be a folder of input images; a run into a used --out
replaces the earlier run's annotated images.
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from PIL import Image

from data.eval_dataset import InferenceDataset
from data.sources import IMAGE_SUFFIXES, exif_orientation, images_below
from detector.cli import add_model_arguments, load_model, model_num_classes, read_class_names
from detector.predict import annotated_names, earlier_entries, predict
from engine import output_folder
from yolo_admm.wording import counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="image files, or folders of images (their sub-folders too)")
    parser.add_argument("--out", type=Path, default=Path("runs/predict"),
                        help="output folder for the annotated images and detections.json (per image: class, score, "
                             "xyxy box in the displayed image's pixels); not a folder of input images "
                             "(default: runs/predict)")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold, objectness x class (default: 0.25)")
    parser.add_argument("--iou", type=float, default=0.45, help="per-class NMS IoU threshold (default: 0.45)")
    parser.add_argument("--max-det", type=int, default=100, help="detections kept per image (default: 100)")
    parser.add_argument("--names", type=Path,
                        help="class names: a Darknet .names file (one per line), a data.yaml or a COCO json (default: "
                             "those a compact archive carries, else class indices)")


UNREAD_IMAGE_SUFFIXES = (".gif", ".jfif", ".heic", ".heif", ".avif", ".jxl", ".svg", ".ico")


def collect_images(sources: list[str], ours: frozenset[str] = frozenset()) -> list[Path]:
    """Image files named directly, plus the images in and below named folders (sorted; hidden files
    such as macOS's ._x.jpg left out, and a warning for images of a type not read, such as .gif;
    `ours`, the real paths of an earlier run's annotated copies, left out of the folders)."""
    images = []
    for source in map(Path, sources):
        if source.is_dir():
            listed = [path for path in images_below(source, IMAGE_SUFFIXES + UNREAD_IMAGE_SUFFIXES) if path.is_file()]
            found = sorted(path for path in listed
                           if path.suffix.lower() in IMAGE_SUFFIXES and os.path.realpath(path) not in ours)
            unread = sorted(path.name for path in listed if path.suffix.lower() in UNREAD_IMAGE_SUFFIXES)
            if unread:
                warnings.warn(f"{source}: {len(unread)} image(s) of a type not read here left out (e.g. {unread[0]}; "
                              f"read are {', '.join(IMAGE_SUFFIXES)})", stacklevel=2)
            if not found:
                raise FileNotFoundError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
            images += found
        elif source.is_file():
            images.append(source)
        else:
            raise FileNotFoundError(f"{source}: no such image file or folder")
    return images


def annotated_copies(out: Path) -> frozenset[str]:
    """The real paths of the annotated images an earlier run wrote into `out` (its detections.json)."""
    return frozenset(os.path.realpath(out / entry["annotated"]) for entry in earlier_entries(out / "detections.json"))


def readable_images(images: list[Path]) -> list[Path]:
    """`images` without those PIL cannot open (a zero-byte file, a text file named .jpg), each
    left out with a warning.

    Raises:
        ValueError: none is readable.
    """
    readable = []
    for image in images:
        try:
            with Image.open(image):
                readable.append(image)
        except (OSError, SyntaxError, ValueError) as err:
            warnings.warn(f"{image}: not a readable image, left out ({err})", stacklevel=2)
    if not readable:
        raise ValueError(f"none of the {len(images)} image(s) can be read")
    return readable


def check_out_folder(out: Path, images: list[Path]) -> None:
    """--out must not be the folder of an input image (the one holding it, or a link to it, and the
    one its file is in): its annotated copy would replace it. Nor may an annotated copy replace a
    file there that an earlier predict did not write (its detections.json does not list it)."""
    inputs = {image.parent.resolve() for image in images} | {image.resolve().parent for image in images}
    if out.resolve() in inputs:
        raise ValueError(f"--out {out}: expected a folder that holds none of the input images, found one that does "
                         f"(their annotated copies would replace them); choose another --out")
    ours = annotated_copies(out)
    foreign = [name for name in annotated_names(images)
               if os.path.lexists(out / name) and os.path.realpath(out / name) not in ours]
    if foreign:
        raise ValueError(f"--out {out}: expected a folder whose files of these names an earlier predict wrote, found "
                         f"{counted(len(foreign), 'other file')} that the annotated images would replace (e.g. "
                         f"{foreign[0]}); choose another --out")


def run(args: argparse.Namespace) -> int:
    if not (0 <= args.conf <= 1 and 0 <= args.iou <= 1 and args.max_det >= 1):
        raise ValueError(f"--conf and --iou must be in [0, 1] and --max-det >= 1, found "
                         f"{args.conf}, {args.iou}, {args.max_det}")
    images = readable_images(collect_images(args.sources, annotated_copies(args.out)))
    check_out_folder(args.out, images)
    model, net_w, net_h, letterbox = load_model(args)
    if args.names is None and model.class_names:        # those a compact archive carries
        class_names = model.class_names
    else:
        class_names = read_class_names(args.names, model_num_classes(model))
    output_folder(args.out, "--out")                # after the inputs are known good: no empty folder
    dataset = InferenceDataset(images, None, net_w, net_h, letterbox,
                               [exif_orientation(Path(image)) for image in images])   # photos as displayed
    json_path = predict(model, dataset, args.out, class_names, args.conf, args.iou, args.max_det,
                        progress=args.progress)
    print(f"predict: {counted(len(images), 'image')} -> {args.out}/ (detections in {json_path})")
    return 0
