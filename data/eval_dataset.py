"""Images for inference: read, fitted to the network input, with what is needed to map boxes back.

`InferenceDataset(paths, image_ids, net_w, net_h, letterbox)[i]` returns
`(image Tensor[3, net_h, net_w] float RGB in [0, 1], ImageMeta)`; `collate_inference` stacks a
batch into `(Tensor[B, 3, net_h, net_w], list[ImageMeta])`. `InferenceDataset.from_source` reads
the images of a `DetectionSource`.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.geometry import FitTransform, fit_transform, place_on_canvas, resize_content
from data.sources import TRANSPOSING_ORIENTATIONS, DetectionSource, exif_orientation

# OpenCV turns an image by its EXIF orientation tag unless told not to. `read_rgb` lets it only for
# the images whose tag PIL read for their size (`data.sources.displayed_size`), so that size and
# pixels agree; OpenCV's turns equal PIL's `ImageOps.exif_transpose` (tests/test_sources.py).
_STORED = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_TURNED = cv2.IMREAD_COLOR
JPEG_TAIL_BYTES = 4096


@dataclass(frozen=True)
class ImageMeta:
    """Where an input image came from and how it was fitted to the network."""

    image_id: int
    path: Path
    transform: FitTransform
    orientation: int = 1


def read_rgb(path: str | Path, orientation: int = 1) -> np.ndarray:
    """Read an image file as uint8 ndarray[H, W, 3] RGB: its stored pixels when `orientation` is 1,
    else turned by its EXIF orientation tag (the `orientation` that `data.sources.displayed_size`
    read from the same file)."""
    image = cv2.imread(os.fsencode(path), _STORED if orientation == 1 else _TURNED)   # bytes: any file name
    if image is None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: image not found")
        raise ValueError(f"{path}: not a readable image")
    if _is_cut_short_jpeg(Path(path)):          # libjpeg's own warning names no file
        warnings.warn(f"{path}: a JPEG without its end marker (cut short?): its missing part is decoded as grey",
                      stacklevel=2)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _is_cut_short_jpeg(path: Path) -> bool:
    """Whether `path` is a JPEG (by its first bytes) cut short, of which OpenCV decodes the part
    that is there. Its last `JPEG_TAIL_BYTES` holding the end-of-image marker say it is whole (at
    the cost of reading them); otherwise (a file cut short, or one with more data after the
    marker, as a motion photo's video) PIL decodes it to tell, and raises where it is cut short."""
    with open(path, "rb") as stream:
        if stream.read(2) != b"\xff\xd8":
            return False
        stream.seek(max(0, os.fstat(stream.fileno()).st_size - JPEG_TAIL_BYTES))
        if b"\xff\xd9" in stream.read():
            return False
    try:
        with Image.open(path) as image:
            image.load()
    except OSError:                                  # "image file is truncated"
        return True
    return False


def read_annotated_image(path: str | Path, orientation: int, annotated_wh: tuple[int, int]) -> np.ndarray:
    """`read_rgb(path, orientation)`, turned by the file's own EXIF orientation when the annotation's
    `annotated_wh` has the shape of the displayed image rather than of the stored one (a COCO json
    written by a tool that applied the tag; the file may have been resized since, so the aspect
    ratio decides, not the size). Another size is left to the caller, who scales the annotation to
    the image (training) or the detections to the annotation (evaluation), so both agree."""
    image = read_rgb(path, orientation)
    if orientation == 1 and (image.shape[1], image.shape[0]) != tuple(annotated_wh):
        tag = exif_orientation(Path(path))
        if tag in TRANSPOSING_ORIENTATIONS and _closer_turned(image.shape[1], image.shape[0], *annotated_wh):
            return read_rgb(path, tag)
    return image


def _closer_turned(width: int, height: int, annotated_w: int, annotated_h: int) -> bool:
    """Whether an annotation of `annotated_w` x `annotated_h` is closer in aspect ratio to the stored
    `width` x `height` turned by 90 degrees than to it as stored (a square is never turned)."""
    annotated = math.log(annotated_w / annotated_h)
    return abs(annotated - math.log(height / width)) < abs(annotated - math.log(width / height))


def to_network_input(image: np.ndarray, net_w: int, net_h: int, letterbox: bool) -> tuple[torch.Tensor, FitTransform]:
    """Fit uint8 RGB ndarray[H, W, 3] to the network: (Tensor[3, net_h, net_w] in [0, 1], transform).

    The arithmetic is numpy's (single-threaded): on ops this small, multi-threaded torch spends
    more on thread synchronisation than it saves (badly so on a busy machine).
    """
    transform = fit_transform(image.shape[1], image.shape[0], net_w, net_h, letterbox)
    content = resize_content(image, transform)
    chw = np.empty((3, transform.new_h, transform.new_w), np.float32)
    np.divide(content.transpose(2, 0, 1), np.float32(255.0), out=chw)
    return torch.from_numpy(place_on_canvas(chw, transform)), transform


class InferenceDataset(Dataset):
    """Image files fitted to a `net_w` x `net_h` network input (plain resize or letterbox)."""

    def __init__(self, paths: Sequence[str | Path], image_ids: Sequence[int] | None,
                 net_w: int, net_h: int, letterbox: bool, orientations: Sequence[int] | None = None,
                 annotated_sizes: Sequence[tuple[int, int]] | None = None):
        """orientations: the EXIF orientation to turn each image by (see `read_rgb`; None: all 1).
        annotated_sizes: (width, height) of each image in its annotation; detections are then mapped
        to those pixels when the file's size differs (see `read_annotated_image`)."""
        self.paths = [Path(p) for p in paths]
        self.annotated_sizes = None if annotated_sizes is None else [tuple(size) for size in annotated_sizes]
        if self.annotated_sizes is not None and len(self.annotated_sizes) != len(self.paths):
            raise ValueError(f"got {len(self.paths)} paths but {len(self.annotated_sizes)} annotated sizes")
        self.image_ids = list(range(1, len(self.paths) + 1)) if image_ids is None else list(image_ids)
        self.orientations = [1] * len(self.paths) if orientations is None else list(orientations)
        if not len(self.image_ids) == len(self.orientations) == len(self.paths):
            raise ValueError(f"got {len(self.paths)} paths but {len(self.image_ids)} image ids and "
                             f"{len(self.orientations)} orientations")
        self.net_w, self.net_h, self.letterbox = net_w, net_h, letterbox

    @classmethod
    def from_source(cls, source: DetectionSource, net_w: int, net_h: int, letterbox: bool) -> "InferenceDataset":
        return cls([r.path for r in source.records], [r.image_id for r in source.records], net_w, net_h, letterbox,
                   [r.orientation for r in source.records], [(r.width, r.height) for r in source.records])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ImageMeta]:
        path, orientation = self.paths[index], self.orientations[index]
        if self.annotated_sizes is None:
            pixels = read_rgb(path, orientation)
        else:
            pixels = read_annotated_image(path, orientation, self.annotated_sizes[index])
        image, transform = to_network_input(pixels, self.net_w, self.net_h, self.letterbox)
        if self.annotated_sizes is not None:    # detections back in the annotation's pixels
            transform = replace(transform, orig_w=self.annotated_sizes[index][0], orig_h=self.annotated_sizes[index][1])
        return image, ImageMeta(self.image_ids[index], path, transform, orientation)


def collate_inference(batch: list[tuple[torch.Tensor, ImageMeta]]) -> tuple[torch.Tensor, list[ImageMeta]]:
    """Stack images into Tensor[B, 3, net_h, net_w]; metas stay a list."""
    images, metas = zip(*batch)
    return torch.stack(images), list(metas)
