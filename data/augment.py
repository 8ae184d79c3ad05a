"""Training augmentation for detection: an albumentations pipeline with boxes, from Darknet's [net].

`build_train_transform(AugmentConfig(...))` augments one image, in order:
1. Darknet's `jitter` (`CropAndPad`): each side of the image is cropped or padded by its own random
   fraction in [-jitter, jitter] of the image's width (left, right) or height (top, bottom), as
   Darknet's `load_data_detection` draws pleft, pright, ptop and pbot. So the content is zoomed by
   1 / (1 + 2 jitter) .. 1 / (1 - 2 jitter) per axis, which also changes its aspect ratio, and shifted.
   Darknet pads with the image's mean colour, this pads with grey.
2. fit to `size` x `size`: plain resize (stretch, as Darknet), or letterbox on a grey border (`letterbox`),
3. Darknet's `resize` (`Affine`, only when resize != 1): a zoom of the same factor in x and y, in
   [1/resize, resize] (in [resize, 1] for resize < 1: zoom out only). Darknet draws the two corners'
   shifts apart, so its zoom also moves the image; jitter's shift is the only one here.
4. horizontal flip,
5. colour jitter: hue shift in [-hue, hue] of the colour circle, saturation and brightness
   (Darknet's exposure) factors in [1/s, s] and [1/e, e].

`build_mosaic_transform(config)` joins four such augmented `size` x `size` images (the dataset
passes three as `mosaic_metadata`) into a 2x2 mosaic (`albumentations.Mosaic`), cut at seams that
fall in [0.2, 0.8] of the side: as Darknet, which augments each of a mosaic's images on its own.
The dataset uses it with probability `mosaic`.

`build_plain_transform(size, letterbox)` is step 2 alone (no augmentation). All take and return
uint8 RGB images with `bboxes` in pixel xyxy (albumentations "pascal_voc") and `class_labels`;
boxes leaving the image are clipped, and dropped when narrower or lower than `min_box_size` px.
A mosaic shows about a quarter of each of its 4 images (a `size` x `size` crop of their 2 x 2
grid of `size` x `size` cells), so most of their boxes fall outside it (about 2 in 3 on coco128).
The training letterbox rounds its scaled size (albumentations) where the evaluation's floors it
(Darknet): the two can place an image 1 px apart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

# Deliberately a side effect at import, before albumentations is imported: unless told not to, it
# asks PyPI for a newer version at import, and nothing here may go online at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from data.geometry import LETTERBOX_FILL

FILL = int(round(LETTERBOX_FILL * 255))  # grey, as Darknet's letterbox border
MOSAIC_CENTRE_RANGE = (0.2, 0.8)         # the seams fall in 0.2-0.8 of the side, as Darknet's cut_x, cut_y


@dataclass(frozen=True)
class AugmentConfig:
    """Settings of the training augmentation.

    Attributes:
        size: output side in pixels (a multiple of 32).
        letterbox: keep the aspect ratio and pad (Darknet `letter_box=1`), else stretch.
        hue: max hue shift as a fraction of the colour circle (Darknet `hue`, 0..0.5).
        saturation: saturation factor range [1/saturation, saturation] (Darknet `saturation`, >= 1).
        exposure: brightness factor range [1/exposure, exposure] (Darknet `exposure`, >= 1).
        flip: probability of a horizontal flip (Darknet `flip=1` flips half the images).
        jitter: each side is cropped or padded by up to this fraction of the image's width or height,
            drawn apart (Darknet's `[yolo] jitter`, in [0, 0.5)).
        resize: a zoom in [1/resize, resize] of the same factor in x and y (Darknet's `[yolo]
            resize`; 1: none; below 1: zoom out only, in [resize, 1]).
        mosaic: probability of a 2x2 mosaic (Darknet `mosaic=1` uses it on half the batches).
        min_box_size: boxes smaller than this (px, after augmentation) in width or height are dropped.
    """

    size: int
    letterbox: bool = False
    hue: float = 0.1
    saturation: float = 1.5
    exposure: float = 1.5
    flip: float = 0.5
    jitter: float = 0.2
    resize: float = 1.0
    mosaic: float = 0.0
    min_box_size: float = 2.0

    def __post_init__(self) -> None:
        problems = []
        if self.size <= 0 or self.size % 32:
            problems.append(f"size must be a positive multiple of 32, found {self.size}")
        if not 0.0 <= self.hue <= 0.5:
            problems.append(f"hue must be in [0, 0.5], found {self.hue}")
        if self.saturation < 1.0 or self.exposure < 1.0:
            problems.append(f"saturation and exposure must be >= 1, found {self.saturation}, {self.exposure}")
        if not (0.0 <= self.flip <= 1.0 and 0.0 <= self.mosaic <= 1.0):
            problems.append(f"flip and mosaic are probabilities in [0, 1], found {self.flip}, {self.mosaic}")
        if not 0.0 <= self.jitter < 0.5:
            problems.append(f"jitter must be in [0, 0.5) (a side may lose up to that fraction), found {self.jitter}")
        if not self.resize > 0.0:
            problems.append(f"resize must be > 0, found {self.resize}")
        if problems:
            raise ValueError("AugmentConfig: " + "; ".join(problems))

    @classmethod
    def from_net(cls, net, size: int | None = None, **overrides) -> "AugmentConfig":
        """Defaults from a Darknet `[net]` (`detector.NetConfig`): hue, saturation, exposure,
        flip, mosaic, letter_box and width; keyword arguments override any field (`jitter` and
        `resize` are options of Darknet's `[yolo]`, which the caller passes this way)."""
        from_cfg = {
            "size": int(size if size is not None else net.width),
            "letterbox": bool(getattr(net, "letter_box", False)),
            "hue": float(getattr(net, "hue", cls.hue)),
            "saturation": float(getattr(net, "saturation", cls.saturation)),
            "exposure": float(getattr(net, "exposure", cls.exposure)),
            "flip": 0.5 if int(getattr(net, "flip", 1)) else 0.0,
            "mosaic": 0.5 if int(getattr(net, "mosaic", 0)) else 0.0,
        }
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"AugmentConfig.from_net: unknown settings {sorted(unknown)}")
        return replace(cls(**from_cfg), **overrides)


PLAIN_MIN_BOX_SIZE = 1.0         # px: without augmentation, only boxes a resize shrinks below a pixel go


def build_plain_transform(size: int, letterbox: bool, min_box_size: float = PLAIN_MIN_BOX_SIZE) -> A.Compose:
    """Fit to `size` x `size` (resize or letterbox) without any augmentation."""
    return A.Compose(_fit_steps(size, letterbox), bbox_params=_bbox_params(min_box_size))


def build_train_transform(config: AugmentConfig) -> A.Compose:
    """One image's augmentation, as the module docstring lists it (`config.mosaic` is the dataset's)."""
    steps = []
    if config.jitter > 0:
        steps.append(A.CropAndPad(percent=(-config.jitter, config.jitter), sample_independently=True,
                                  keep_size=False, border_mode=cv2.BORDER_CONSTANT, fill=FILL, p=1.0))
    steps += _fit_steps(config.size, config.letterbox)
    if config.resize != 1:
        zoom = (config.resize, 1.0) if config.resize < 1 else (1 / config.resize, config.resize)
        steps.append(A.Affine(scale=zoom, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=FILL, p=1.0))
    steps += [
        A.HorizontalFlip(p=config.flip),
        A.ColorJitter(brightness=(1 / config.exposure, config.exposure), contrast=(1.0, 1.0),
                      saturation=(1 / config.saturation, config.saturation),
                      hue=(-config.hue, config.hue), p=1.0),
    ]
    return A.Compose(steps, bbox_params=_bbox_params(config.min_box_size))


def build_mosaic_transform(config: AugmentConfig) -> A.Compose:
    """A 2x2 mosaic of four images already augmented to `size` x `size` (the first as `image`, the
    other three as `mosaic_metadata` dicts of image, bboxes and class_labels)."""
    if not hasattr(A, "Mosaic"):
        raise ValueError(f"mosaic needs albumentations.Mosaic, which albumentations {A.__version__} "
                         f"lacks; upgrade albumentations or set mosaic to 0")
    mosaic = A.Mosaic(grid_yx=(2, 2), target_size=(config.size, config.size), cell_shape=(config.size, config.size),
                      center_range=MOSAIC_CENTRE_RANGE, fill=FILL, p=1.0)
    return A.Compose([mosaic], bbox_params=_bbox_params(config.min_box_size))


def _fit_steps(size: int, letterbox: bool) -> list:
    if not letterbox:
        return [A.Resize(size, size, interpolation=cv2.INTER_LINEAR)]
    return [A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=FILL)]


def _bbox_params(min_box_size: float) -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["class_labels"], min_width=min_box_size,
                        min_height=min_box_size, clip=True, filter_invalid_bboxes=True)
