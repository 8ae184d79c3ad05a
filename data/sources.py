"""Detection data sources: a list of annotated images, read from COCO json or Ultralytics YOLO txt.

Both readers return a `DetectionSource` whose records hold boxes as float32 xyxy in original-image
pixels and classes as model class indices, and which turns back into a COCO ground-truth dict
(`to_coco()`) for pycocotools.

- `load_coco_json(images_dir, annotations_json)`: model class i is the i-th category by sorted id
  (for COCO's 80 categories this is Darknet's coco.names order). Annotations keep their `area` (the
  segmentation area COCO uses for the small/medium/large split; without one, the clipped box's) and
  `iscrowd`; boxes are clipped to their image, as detections are (one warning per json counts
  those that reached past it by more than a pixel: such a box could never be matched exactly).
  Boxes without area are kept, as pycocotools counts them (no detection can match one).
- `load_yolo_dataset(data_yaml, split)`: Ultralytics-style data yaml. Category id of class i is i+1.
  Boxes are clipped to the image and degenerate ones dropped; an image without a label file (or
  with an empty one) is a background image without objects.

Bad input, YOLO txt: a label line that is not numbers, has a class outside 0..nc-1 or a value that
is not finite, or an image file PIL cannot read, is an error naming the file (and line). Label
coordinates outside [0, 1] are clipped as Darknet does, with one warning per split naming the
first such line; when every label line of a split is outside by more than rounding (pixel
coordinates, say), it is an error. Lines whose box has no area are dropped with a warning. A split
where no image has a label file gets a warning (the labels folder is elsewhere?).

Image ids: the COCO json's own ids; for YOLO txt, the integer file stem when every stem is a unique
number (COCO's 000000000139.jpg -> 139, so results match the official ids), else 1, 2, ... in order.
Image sizes come from the file header (PIL). EXIF orientation: YOLO txt labels are of the image
as displayed, so those images are turned by their EXIF orientation tag when read, as Ultralytics and
Darknet (built with OpenCV) do, and their sizes are the turned ones (`DetectionRecord.orientation`);
COCO json boxes are taken in stored pixel order, as the COCO annotations are, unless the json's
width and height have the shape of the displayed image and not of the stored one (orientations
5-8, also after a resize; with 2-4 the shapes agree and the stored pixels are used). A file of
another size than its json entry says (resized after annotating) is scaled to the annotation in
training and in evaluation alike (`data.read_annotated_image`).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

IMAGE_SUFFIXES = (".bmp", ".dng", ".jp2", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm")
OVERHANG_SLACK_PIXELS = 1.0   # COCO boxes this far past their image are rounding: clipped without a word
ROUNDING_SLACK = 0.01   # label coordinates this far outside [0, 1] are rounding, not another unit


@dataclass
class DetectionRecord:
    """One image and its ground truth.

    Attributes:
        image_id: COCO image id.
        path: image file.
        width, height: image size in pixels.
        boxes: float32 ndarray[n, 4], xyxy in original-image pixels.
        classes: int64 ndarray[n], model class indices.
        iscrowd: bool ndarray[n].
        areas: float32 ndarray[n], the COCO `area` of each object, or None to use the box area.
        orientation: the EXIF orientation (1-8) to turn the stored pixels by when reading the image
            (`data.read_rgb`); 1 leaves them as stored. width, height and boxes are of the turned image.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray | None = None
    orientation: int = 1


@dataclass
class DetectionSource:
    """Annotated images plus the class list.

    Attributes:
        records: one `DetectionRecord` per image.
        class_names: model class order.
        category_ids: model class i -> COCO category id.
    """

    records: list[DetectionRecord]
    class_names: list[str]
    category_ids: list[int]

    def to_coco(self) -> dict:
        """COCO ground-truth dict (info, images, annotations, categories) for pycocotools."""
        images, annotations = [], []
        for record in self.records:
            images.append({"id": record.image_id, "file_name": record.path.name,
                           "width": record.width, "height": record.height})
            widths = record.boxes[:, 2] - record.boxes[:, 0]
            heights = record.boxes[:, 3] - record.boxes[:, 1]
            areas = widths * heights if record.areas is None else record.areas
            for i in range(len(record.boxes)):
                annotations.append({
                    "id": len(annotations) + 1,  # pycocotools treats id 0 as "unmatched"
                    "image_id": record.image_id,
                    "category_id": self.category_ids[int(record.classes[i])],
                    "bbox": [float(record.boxes[i, 0]), float(record.boxes[i, 1]),
                             float(widths[i]), float(heights[i])],
                    "area": float(areas[i]),
                    "iscrowd": int(record.iscrowd[i]),
                })
        categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)]
        return {"info": {}, "licenses": [], "images": images, "annotations": annotations,
                "categories": categories}


def load_coco_json(images_dir: str | Path, annotations_json: str | Path) -> DetectionSource:
    """Read a COCO instances json; images are `images_dir / file_name`.

    Raises:
        FileNotFoundError: the json, the folder or an image it lists is missing.
        ValueError: the json is malformed (the message names the file and the entry).
    """
    images_dir, annotations_json = Path(images_dir), Path(annotations_json)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images folder not found")
    coco = _read_coco_json(annotations_json)
    categories = coco["categories"]
    class_of_category = {c["id"]: i for i, c in enumerate(categories)}
    objects = _group_coco_annotations(coco["annotations"], class_of_category, annotations_json)
    records, seen_ids = [], set()
    overhanging = 0
    for image in coco["images"]:
        _check_entry(image, {"id": int, "file_name": str, "width": int, "height": int}, "image", annotations_json)
        if image["width"] <= 0 or image["height"] <= 0:
            raise ValueError(f"{annotations_json}: image {image['id']}: expected a positive width and height, "
                             f"found {image['width']}x{image['height']}")
        if image["id"] in seen_ids:
            raise ValueError(f"{annotations_json}: image id {image['id']} is listed twice in 'images'; "
                             f"expected unique ids")
        seen_ids.add(image["id"])
        path = images_dir / image["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{annotations_json}: image id {image['id']} -> {path}: not found")
        boxes, classes, iscrowd, areas = objects.pop(image["id"], ([], [], [], []))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scale = np.array([image["width"], image["height"]] * 2, np.float32)
        clipped = np.clip(boxes, 0, scale)
        overhanging += int((np.abs(clipped - boxes) > OVERHANG_SLACK_PIXELS).any(axis=1).sum())
        areas = np.asarray(areas, np.float32).reshape(-1)
        areas = np.where(np.isnan(areas), (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]), areas)
        records.append(DetectionRecord(
            image_id=int(image["id"]), path=path, width=int(image["width"]), height=int(image["height"]),
            boxes=clipped, classes=np.asarray(classes, np.int64), iscrowd=np.asarray(iscrowd, bool),
            areas=areas.astype(np.float32)))
    if objects:
        raise ValueError(f"{annotations_json}: annotations refer to image ids not in 'images': "
                         f"{sorted(objects)[:5]}")
    if overhanging:
        warnings.warn(f"{annotations_json}: annotations whose box reaches more than {OVERHANG_SLACK_PIXELS:g} px "
                      f"outside its image: {overhanging}; they were clipped to the image", stacklevel=2)
    return DetectionSource(records, [str(c["name"]) for c in categories], [int(c["id"]) for c in categories])


def coco_class_names(annotations_json: str | Path) -> list[str]:
    """The class names of a COCO instances json, in model class order (its categories by sorted id),
    as `load_coco_json` gives them; errors as there."""
    return [str(c["name"]) for c in _read_coco_json(Path(annotations_json))["categories"]]


def _read_coco_json(annotations_json: Path) -> dict:
    """A COCO instances json without its segmentations, checked to have 'images', 'annotations' and
    'categories' lists and every category a unique integer id and a name; categories sorted by id."""
    if not annotations_json.is_file():
        raise FileNotFoundError(f"{annotations_json}: COCO annotations json not found")
    with open(annotations_json, encoding="utf-8") as f:
        try:
            coco = json.load(f, object_hook=_without_segmentation)
        except json.JSONDecodeError as err:
            raise ValueError(f"{annotations_json}: not valid json ({err})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key) if isinstance(coco, dict) else None, list):
            raise ValueError(f"{annotations_json}: expected a COCO instances json with a "
                             f"'{key}' list, found none")
    for category in coco["categories"]:
        _check_entry(category, {"id": int, "name": str}, "category", annotations_json)
    unique = {(c["id"], c["name"]): c for c in coco["categories"]}      # the same entry twice: once
    coco["categories"] = sorted(unique.values(), key=lambda c: c["id"])
    for earlier, category in zip(coco["categories"], coco["categories"][1:]):
        if category["id"] == earlier["id"]:
            raise ValueError(f"{annotations_json}: category id {category['id']} is listed twice in 'categories' "
                             f"({earlier['name']!r} and {category['name']!r}); expected unique ids")
    return coco


def _without_segmentation(entry: dict) -> dict:
    """`entry` without its 'segmentation' (json.load's object_hook: nothing here uses the polygons,
    which are most of a COCO json; dropped as each object is read, they never pile up: reading
    instances_train2017.json takes less than half the memory, and a quarter less time, see
    benchmarks/coco_index.py)."""
    entry.pop("segmentation", None)
    return entry


def _check_entry(entry: Any, fields: dict[str, type], kind: str, json_path: Path) -> None:
    """Check, in place, that `entry` is a dict with `fields` of those types; ValueError naming the
    json and the entry otherwise. An int field takes a whole number (640, 640.0 or "640", stored
    back as 640) but no bool; a str field only text."""
    where = f"{json_path}: {kind} {entry.get('id', '(no id)') if isinstance(entry, dict) else entry!r:.60}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, found {type(entry).__name__}")
    for name, kind_type in fields.items():
        value = entry.get(name)
        checked = _whole_number(value) if kind_type is int else (value if isinstance(value, str) else None)
        if checked is None:
            raise ValueError(f"{where}: expected '{name}' ({'a whole number' if kind_type is int else 'text'}), "
                             f"found {value!r:.60}")
        entry[name] = checked


def _whole_number(value: Any) -> int | None:
    """`value` as an int when it is one (640, 640.0, "640"), else None (bools, fractions, other text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return None


def _group_coco_annotations(annotations: list[dict], class_of_category: dict[int, int],
                            json_path: Path) -> dict[int, tuple[list, list, list, list]]:
    """image id -> (xyxy boxes, class indices, iscrowd flags, areas), in json order."""
    grouped: dict[int, tuple[list, list, list, list]] = {}
    for ann in annotations:
        _check_entry(ann, {"image_id": int}, "annotation", json_path)
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            raise ValueError(f"{json_path}: annotation id {ann.get('id')}: expected 'bbox' [x, y, w, h] of "
                             f"numbers with w, h >= 0, found {bbox!r}")
        if ann.get("category_id") not in class_of_category:
            raise ValueError(f"{json_path}: annotation id {ann.get('id')}: category_id "
                             f"{ann.get('category_id')!r} is not in 'categories'")
        x, y, w, h = (float(v) for v in bbox)
        boxes, classes, iscrowd, areas = grouped.setdefault(ann["image_id"], ([], [], [], []))
        boxes.append((x, y, x + w, y + h))
        classes.append(class_of_category[ann["category_id"]])
        iscrowd.append(bool(ann.get("iscrowd", 0)))
        areas.append(float(ann["area"]) if "area" in ann else math.nan)      # nan: the clipped box's area
    return grouped


def load_yolo_dataset(data_yaml: str | Path, split: str = "val") -> DetectionSource:
    """Read an Ultralytics data yaml and the YOLO txt labels of one split.

    The yaml's `path` (relative paths are taken from the yaml's folder; absent means that folder) is
    the root of the split entries. A split entry is a folder of images (searched recursively), a
    .txt file listing image paths, or a list of these. Labels of `.../images/.../x.jpg` are in
    `.../labels/.../x.txt` (the last `/images/` replaced), one `class cx cy w h` line per object,
    normalised to 0..1 (a polygon line `class x1 y1 x2 y2 ...` gives its bounding box).

    Raises:
        FileNotFoundError: the yaml, a split folder/list or a listed image is missing.
        ValueError: the yaml or a label line is malformed (the message names file and line).
    """
    data_yaml = Path(data_yaml)
    spec = read_data_yaml(data_yaml)
    names = parse_class_names(spec, data_yaml)
    if spec.get(split) is None:
        raise ValueError(f"{data_yaml}: split {split!r} not found; the yaml has "
                         f"{[k for k in ('train', 'val', 'test') if spec.get(k)]}")
    root = data_yaml.parent / str(spec.get("path") or ".")
    image_paths = _split_images(spec[split], root.resolve(), data_yaml, split)
    if not image_paths:
        raise ValueError(f"{data_yaml}: split {split!r} has no images")
    box_fields_only = spec.get("kpt_shape") is not None      # pose labels: class cx cy w h, then keypoints
    records, labelled, outside, lines, repeated, empty = [], 0, [], 0, [], []
    for image_id, path in zip(_image_ids(image_paths), image_paths):
        record, label_lines, outside_lines, repeats, empties = _yolo_record(image_id, path, len(names),
                                                                            box_fields_only)
        records.append(record)
        labelled += label_lines is not None
        lines += label_lines or 0
        outside += outside_lines
        repeated += repeats
        empty += empties
    where = f"{data_yaml}: split {split!r}"
    if not labelled:
        warnings.warn(f"{where}: none of its {len(records)} images has a label file (expected e.g. "
                      f"{label_path(image_paths[0])}); all are used as images without objects", stacklevel=2)
    elif not any(len(record.classes) for record in records):
        warnings.warn(f"{where}: its {labelled} label file(s) list no object; all {len(records)} images are used as "
                      f"images without objects (COCO's mAP of them is -1, undefined)", stacklevel=2)
    if repeated:
        warnings.warn(f"{where}: {_label_lines(len(repeated), 'repeat', 'repeats')} an earlier line of their file "
                      f"and {_were(len(repeated))} dropped (one object each, as Ultralytics takes them); "
                      f"first: {repeated[0]}",
                      stacklevel=2)
    if empty:
        warnings.warn(f"{where}: {_label_lines(len(empty), 'have', 'has')} no area in the image (a width or height "
                      f"of 0, or below float32's resolution) and {_were(len(empty))} dropped; first: {empty[0]}",
                      stacklevel=2)
    _check_outside_lines(where, outside, lines)
    return DetectionSource(records, names, list(range(1, len(names) + 1)))


def _label_lines(count: int, plural_verb: str, singular_verb: str) -> str:
    """"1 label line has", "2 label lines have"."""
    return f"1 label line {singular_verb}" if count == 1 else f"{count} label lines {plural_verb}"


def _were(count: int) -> str:
    return "was" if count == 1 else "were"


def _check_outside_lines(where: str, outside: list[tuple[str, float]], lines: int) -> None:
    """Warn about label lines with coordinates outside [0, 1]; an error when all of them are, by more
    than rounding (`ROUNDING_SLACK`: a lone line at 1.000001 is a rounded box, not pixels)."""
    if not outside:
        return
    expected = "expected cx cy w h normalised to the image size (0..1)"
    first = outside[0][0]
    if len(outside) == lines and all(overshoot > ROUNDING_SLACK for _, overshoot in outside):
        which = "its one label line has" if lines == 1 else f"every one of its {lines} label lines has"
        raise ValueError(f"{where}: {which} coordinates outside [0, 1] "
                         f"({expected}; pixel coordinates?), e.g. {first}")
    warnings.warn(f"{where}: {len(outside)} of {lines} label lines {'has' if len(outside) == 1 else 'have'} "
                  f"coordinates outside [0, 1] ({expected}); "
                  f"their boxes were clipped to the image, or dropped when entirely outside; first: {first}",
                  stacklevel=3)


def read_utf8(path: Path) -> str:
    """The text of `path` (UTF-8, a byte order mark allowed); ValueError naming the file and the line
    of the first byte that is not UTF-8 (Python's own error names neither); FileNotFoundError
    naming what is there instead of a file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a text file, found {'a folder' if path.is_dir() else 'nothing'}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        before = err.object[:err.start]
        line = len(before.splitlines()) + (not before or before.endswith((b"\n", b"\r")))   # \n, \r\n or \r
        raise ValueError(f"{path}:{line}: expected UTF-8 text, found the byte 0x{err.object[err.start]:02x}, "
                         f"which is not") from None


def read_data_yaml(data_yaml: Path) -> dict:
    """An Ultralytics data yaml as a dict (a UTF-8 byte order mark allowed; `validation:` read as `val:`;
    a split given as empty text or an empty list read as absent)."""
    text = read_utf8(data_yaml)
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{data_yaml}: not valid yaml ({' '.join(str(err).split())})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{data_yaml}: expected a mapping with 'names' and the splits, found {type(spec).__name__}")
    for split in ("train", "val", "validation", "test"):
        entry = spec.get(split)
        if entry == [] or (isinstance(entry, str) and not entry.strip()):   # `val: ''`: none, as Ultralytics
            spec[split] = None
    if spec.get("val") is None and spec.get("validation") is not None:
        spec["val"] = spec["validation"]
    return spec


def parse_class_names(spec: dict, data_yaml: Path) -> list[str]:
    """The class names of a parsed data yaml: `names` as a list, or a dict {0: name, ...} with keys
    0..n-1 (numbers, or their text); without `names`, `nc` numbered ones (class_0, class_1, ...)."""
    names = spec.get("names") if isinstance(spec, dict) else None
    count = _whole_number(spec.get("nc")) if isinstance(spec, dict) else None
    if names is None and count is not None and count >= 1:      # nc alone: numbered classes, as Ultralytics names them
        names = [f"class_{index}" for index in range(count)]
    if isinstance(names, dict):
        keys = {key if _whole_number(key) is None else _whole_number(key): value for key, value in names.items()}
        if set(keys) != set(range(len(names))):
            raise ValueError(f"{data_yaml}: 'names' keys must be 0..{len(names) - 1}, found {list(names)}")
        names = [keys[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{data_yaml}: expected 'names' as a non-empty list or dict, found {names!r}")
    if "nc" in spec and _whole_number(spec["nc"]) != len(names):
        raise ValueError(f"{data_yaml}: nc is {spec['nc']!r} but 'names' has {len(names)} entries")
    for index, name in enumerate(names):
        if not isinstance(name, (str, int, float)) or isinstance(name, bool):
            hint = ""
            if isinstance(name, bool):
                hint = " (yaml reads an unquoted yes, no, on or off as a truth value: quote it)"
            raise ValueError(f"{data_yaml}: 'names' entry {index}: expected a class name, found {name!r}{hint}")
    return [str(n) for n in names]


def _split_images(entry: str | list, root: Path, data_yaml: Path, split: str) -> list[Path]:
    """Image files of a split entry (folder, .txt list or list of these), in sorted order, each once
    (a warning counts those listed more than once)."""
    paths: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        if not isinstance(item, (str, int)) or isinstance(item, bool):
            raise ValueError(f"{data_yaml}: split {split!r}: entry {item!r}: expected the path of a folder of "
                             f"images or of a .txt list, found {type(item).__name__}")
        item = str(item)
        if not item.strip():
            raise ValueError(f"{data_yaml}: split {split!r}: an empty path among its entries {entry!r}; "
                             f"expected the path of a folder of images or of a .txt list")
        location = Path(item) if Path(item).is_absolute() else root / item
        if not location.exists() and str(item).startswith("../") and (root / str(item)[3:]).exists():
            location = root / str(item)[3:]         # Roboflow's exports write ../train/images beside the yaml
        if location.is_dir():
            paths += images_below(location)
        elif location.is_file() and location.suffix == ".txt":
            paths += _listed_images(location)
        else:
            raise FileNotFoundError(f"{data_yaml}: split entry {item!r} -> {location}: "
                                    f"expected a folder of images or a .txt list, found nothing")
    unique = sorted(set(paths))
    if len(unique) < len(paths):
        repeated = sum(count > 1 for count in Counter(paths).values())
        warnings.warn(f"{data_yaml}: split {split!r} lists {repeated} {'image' if repeated == 1 else 'images'} "
                      f"more than once (repeated lines of a .txt list, or overlapping folders); each image is "
                      f"used once",
                      stacklevel=3)
    return unique


def images_below(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files (by `suffixes`, lower case) below `folder`, following symlinked folders
    (each real folder once), leaving out hidden files and folders (such as macOS's ._x.jpg)."""
    images, seen = [], set()
    for current, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:                                  # a link loop, or a folder linked twice
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        images += [Path(current) / name for name in files
                   if not name.startswith(".") and Path(name).suffix.lower() in suffixes]
    return images


def _listed_images(list_file: Path) -> list[Path]:
    """Image paths from a .txt list, one per line, relative ones taken from the list's folder."""
    paths = []
    for number, line in enumerate(read_utf8(list_file).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        path = Path(line) if Path(line).is_absolute() else list_file.parent / line
        if not path.is_file():
            raise FileNotFoundError(f"{list_file}:{number}: image {path} not found")
        paths.append(path)
    return paths


def _image_ids(paths: list[Path]) -> list[int]:
    """Integer stems when all are unique numbers, else 1..n."""
    stems = [p.stem for p in paths]
    if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def label_path(image_path: Path) -> Path:
    """Ultralytics convention: the last `/images/` in the path becomes `/labels/`, suffix `.txt`."""
    parts = list(image_path.parts)
    if "images" not in parts[:-1]:
        return image_path.with_suffix(".txt")
    index = len(parts) - 2 - parts[-2::-1].index("images")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def _yolo_record(image_id: int, image_path: Path, num_classes: int,
                 box_fields_only: bool = False) -> tuple[DetectionRecord, int | None, list[tuple[str, float]],
                                                         list[str], list[str]]:
    """(the record, its label file's line count or None without a label file, its lines with
    coordinates outside [0, 1] with how far outside, its lines that repeat an earlier one, and its
    lines inside [0, 1] whose box has no area; lines as "file:line: 'text'")."""
    width, height, orientation = displayed_size(image_path)
    labels = label_path(image_path)
    rows, texts = _read_label_file(labels, num_classes, box_fields_only) if labels.is_file() \
        else (np.zeros((0, 5), np.float32), [])
    keep = np.sort(np.unique(rows, axis=0, return_index=True)[1])         # each line's first occurrence
    repeats = [texts[i] for i in np.setdiff1d(np.arange(len(rows)), keep)]
    rows, texts = rows[keep], [texts[i] for i in keep]
    line_count = len(texts) if labels.is_file() else None       # the lines kept: those `outside` is of
    overshoot = np.maximum(-rows[:, 1:], rows[:, 1:] - 1).max(axis=1, initial=0.0)
    outside = [(texts[i], float(overshoot[i])) for i in np.flatnonzero(overshoot > 0)]
    scale = np.array([width, height, width, height], np.float32)
    cx, cy, w, h = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * scale
    boxes = np.clip(boxes, 0, scale)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    record = DetectionRecord(image_id, image_path, width, height, boxes[valid].astype(np.float32),
                             rows[valid, 0].astype(np.int64), np.zeros(int(valid.sum()), bool),
                             orientation=orientation)
    empty = [texts[i] for i in np.flatnonzero(~valid & (overshoot <= 0))]   # those outside have their warning
    return record, line_count, outside, repeats, empty


EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)      # these swap width and height
ORIENTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")


def displayed_size(path: Path) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) from the image file's header; width and height of the image
    as displayed, that is turned by its orientation (1 when the file has none)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = _orientation_of(image)
    except (OSError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: expected an image file, found one that cannot be read ({err})") from None
    return (height, width, orientation) if orientation in TRANSPOSING_ORIENTATIONS else (width, height, orientation)


def exif_orientation(path: Path) -> int:
    """The image file's EXIF orientation (1-8); 1 when it has none or PIL cannot read the file."""
    try:
        with Image.open(path) as image:
            return _orientation_of(image)
    except (OSError, SyntaxError):
        return 1


def _orientation_of(image: Image.Image) -> int:
    """The EXIF orientation `read_rgb` is to apply: for the formats whose stored pixels OpenCV hands
    back (JPEG, MPO, WebP, and PNG with an eXIf chunk, which alone PIL reads without decoding the
    image), else 1. OpenCV turns TIFFs itself, and PIL their sizes."""
    if image.format not in ORIENTED_FORMATS or (image.format == "PNG" and "exif" not in image.info):
        return 1
    orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return int(orientation) if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _read_label_file(labels: Path, num_classes: int, box_fields_only: bool = False) -> tuple[np.ndarray, list[str]]:
    """(float32 ndarray[n, 5] of (class, cx, cy, w, h) rows, the n lines as "file:line: 'text'");
    polygons become their bounding box; with `box_fields_only` (pose labels) the fields after the
    first five are left out."""
    rows, texts = [], []
    for number, line in enumerate(read_utf8(labels).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if box_fields_only:
            fields = fields[:5]
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ValueError(f"{labels}:{number}: expected numbers 'class cx cy w h', found {line!r}") from None
        if len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0):
            raise ValueError(f"{labels}:{number}: expected 'class cx cy w h' or a polygon "
                             f"'class x1 y1 x2 y2 ...', found {len(values)} values")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{labels}:{number}: expected finite numbers, found {line.strip()!r}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise ValueError(f"{labels}:{number}: class must be an integer in 0..{num_classes - 1}, found {fields[0]}")
        if len(values) > 5:
            xs, ys = np.array(values[1::2]), np.array(values[2::2])
            values = [cls, (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2,
                      xs.max() - xs.min(), ys.max() - ys.min()]
        rows.append(values)
        texts.append(f"{labels}:{number}: {line.strip()!r}")
    return np.asarray(rows, np.float32).reshape(-1, 5), texts
