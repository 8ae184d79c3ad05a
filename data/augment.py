"""Training augmentation for detection: an albumentations pipeline with boxes, from Darknet's [net].

`build_train_transform(AugmentConfig(...))` augments one image, in order:
1. Darknet's crop (`DarknetCrop`), as `load_data_detection` draws pleft, pright, ptop and pbot:
   - `jitter`: each side is cropped or padded by its own random fraction in [-jitter, jitter] of the
     image's width (left, right) or height (top, bottom). So the content is zoomed by
     1 / (1 + 2 jitter) .. 1 / (1 - 2 jitter) per axis, which also changes its aspect ratio, and shifted;
   - `resize` (when not 1): the left and top sides move by one more random amount, the right and
     bottom sides by another, each in [-(r - 1) / 2, (1 - 1 / r) / 2] of the width or height for
     r = resize > 1 (a pad where negative; for resize < 1, r = 1 / resize and pads only): a zoom
     of both axes alike, with a shift;
   - `letterbox`: the crop is widened or heightened, about the image's centre, to the network's
     (square) aspect ratio, so that the stretch below keeps the image's own aspect.
   Padding takes the image's mean colour, as Darknet's does.
2. stretch to `size` x `size`,
3. horizontal flip,
4. Darknet's colour jitter (`DarknetColour`): in HSV, a hue shift in [-hue, hue] of the colour
   circle, and the saturation and value (brightness, Darknet's exposure) multiplied by factors
   drawn as Darknet's `rand_scale` draws them: in [1, s], inverted half of the time, so that an
   image is as often darker as brighter.

`build_mosaic_transform(config)` joins four such augmented `size` x `size` images (the dataset
passes three as `mosaic_metadata`) into a 2x2 mosaic (`albumentations.Mosaic`), cut at seams that
fall in [0.2, 0.8] of the side: as Darknet, which augments each of a mosaic's images on its own.
The dataset uses it with probability `mosaic`.

`build_plain_transform(size, letterbox)` is the fit alone (resize, or letterbox on a grey border;
no augmentation). All take and return uint8 RGB images with `bboxes` in pixel xyxy (albumentations
"pascal_voc") and `class_labels`; boxes leaving the image are clipped after each step and dropped
when they have no area left. The training transforms leave the `min_box_size` limit to the
dataset, which applies it once to the output: a limit after each step would measure a box in the
source image's pixels, and drop small boxes of an image that the stretch then enlarges.
A mosaic shows about a quarter of each of its 4 images (a `size` x `size` crop of their 2 x 2
grid of `size` x `size` cells), so most of their boxes fall outside it (about 2 in 3 on coco128).
The training letterbox pads the image to a square by whole pixels and then stretches it, where
the evaluation's scales it and then pads (Darknet): the two can place an image 1 px apart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

# Deliberately a side effect at import, before albumentations is imported: unless told not to, it
# asks PyPI for a newer version at import, and nothing here may go online at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

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
        saturation: saturation factors in [1/saturation, saturation], drawn as Darknet draws them
            (`darknet_scale`; Darknet `saturation`, >= 1).
        exposure: brightness factors in [1/exposure, exposure], drawn alike (Darknet `exposure`, >= 1).
        flip: probability of a horizontal flip (Darknet `flip=1` flips half the images).
        jitter: each side is cropped or padded by up to this fraction of the image's width or height,
            drawn apart (Darknet's `[yolo] jitter`, in [0, 0.5)).
        resize: Darknet's `[yolo] resize`, a zoom of both axes alike with a shift (1: none; below
            1: zoom out only); with jitter, a crop must keep part of the image:
            jitter + (1 - 1 / resize) / 2 < 0.5.
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
        problems += crop_problems(self.jitter, self.resize)
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


class DarknetCrop(A.CropAndPad):
    """Darknet's random crop of a training image, step 1 of the module docstring. Its jitter draws
    are CropAndPad's own (`percent=(-jitter, jitter)`, each side apart); the resize and letterbox
    terms are added to them, in pixels, as `load_data_detection` adds them, and a padded side takes
    the image's mean colour (Darknet's `cv::mean`). Keeps the cropped size; a stretch to the
    network's size follows. The offsets of a call pass through `self.px`, so one
    instance must not be called from two threads at once (DataLoader workers are processes)."""

    def __init__(self, jitter: float, resize: float = 1.0, letterbox: bool = False, p: float = 1.0):
        super().__init__(percent=(-jitter, jitter), sample_independently=True, keep_size=False,
                         border_mode=cv2.BORDER_CONSTANT, fill=FILL, p=p)
        self.jitter, self.resize, self.letterbox = float(jitter), float(resize), bool(letterbox)

    def get_transform_init_args(self) -> dict:
        """What `albumentations.to_dict` records, so that `from_dict` rebuilds it."""
        return {"jitter": self.jitter, "resize": self.resize, "letterbox": self.letterbox}

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        top, right, bottom, left = self._get_percent_params()           # CropAndPad's order; > 0 pads
        pads = [top * height, right * width, bottom * height, left * width]
        pads = [float(int(pad)) for pad in pads]                           # as CropAndPad truncates
        if self.resize != 1:
            low, high = _resize_crop_range(self.resize)       # of the width or height; > 0 crops, as Darknet's
            first, second = self.py_random.random(), self.py_random.random()   # left and top / right and bottom
            for side, draw, extent in ((0, first, height), (1, second, width), (2, second, height), (3, first, width)):
                pads[side] -= (low + draw * (high - low)) * extent
        if self.letterbox:                                    # widen or heighten to a square, about the centre
            if width > height:
                pads[0] += (width - height) / 2
                pads[2] += (width - height) / 2
            else:
                pads[1] += (height - width) / 2
                pads[3] += (height - width) / 2
        self.px = [int(pad) for pad in pads]                  # truncated, as Darknet's int offsets
        try:
            chosen = super().get_params_dependent_on_data(params, data)
        finally:
            self.px = None
        if chosen["pad_params"] is not None:
            image = data["image"]
            chosen["fill"] = (float(image.mean()) if image.ndim == 2 else
                              tuple(float(v) for v in image.reshape(-1, image.shape[-1]).mean(axis=0)))
        return chosen


class DarknetColour(A.ImageOnlyTransform):
    """Darknet's colour jitter, step 4 of the module docstring, as `image_data_augmentation` applies
    it to 8-bit images: hue, saturation and value in OpenCV's HSV (hue 0..179), the factors drawn
    by `darknet_scale`; an image drawn no change is left as it is (the HSV round trip alone moves
    pixels by a few levels). Darknet adds the hue shift to the 8-bit hue, which clips at 0, so a
    shift below red stays red; here every shift turns round the circle. (albumentations'
    ColorJitter draws its factors uniformly in [1/s, s], which brightens on average, 1.08x for
    s = 1.5, and blends with grey for saturation, which also changes the brightness.)"""

    def __init__(self, hue: float, saturation: float, exposure: float, p: float = 1.0):
        super().__init__(p=p)
        self.hue, self.saturation, self.exposure = float(hue), float(saturation), float(exposure)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("hue", "saturation", "exposure")

    def get_params(self) -> dict:
        return {"hue_shift": self.py_random.uniform(-self.hue, self.hue),        # Darknet's order of draws
                "saturation_factor": darknet_scale(self.py_random, self.saturation),
                "value_factor": darknet_scale(self.py_random, self.exposure)}

    def apply(self, img, hue_shift: float, saturation_factor: float, value_factor: float, **params):
        return scale_hsv(img, hue_shift, saturation_factor, value_factor)


def darknet_scale(rng, limit: float) -> float:
    """A factor as Darknet's `rand_scale(limit)`: uniform in [1, limit], and its inverse half of the time."""
    factor = rng.uniform(1.0, limit)
    return factor if rng.random() < 0.5 else 1.0 / factor


def scale_hsv(image: np.ndarray, hue_shift: float, saturation_factor: float, value_factor: float) -> np.ndarray:
    """uint8 RGB `image` with its hue turned by `hue_shift` of the colour circle and its HSV
    saturation and value multiplied (rounded, clipped to 0..255, as OpenCV's 8-bit arithmetic); a
    grey image (one channel) has its values multiplied, as Darknet does."""
    if hue_shift == 0 and saturation_factor == 1 and value_factor == 1:     # as Darknet: no round trip
        return image
    levels = np.arange(256, dtype=np.float64)
    value = np.clip(np.rint(levels * value_factor), 0, 255).astype(np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
        return value[image]
    hue = ((np.arange(256) + round(hue_shift * 180)) % 180).astype(np.uint8)
    saturation = np.clip(np.rint(levels * saturation_factor), 0, 255).astype(np.uint8)
    h, s, v = cv2.split(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV))
    hsv = cv2.merge([cv2.LUT(h, hue), cv2.LUT(s, saturation), cv2.LUT(v, value)])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _resize_crop_range(resize: float) -> tuple[float, float]:
    """(low, high): Darknet's `resize` moves a side by a fraction of the width or height drawn in
    this range (> 0 crops): [(1 - r) / 2, (1 - 1 / r) / 2] for r = resize >= 1; for resize < 1,
    r = 1 / resize and [(1 - r) / 2, 0] (pads only)."""
    if resize >= 1:
        return (1 - resize) / 2, (1 - 1 / resize) / 2
    return (1 - 1 / resize) / 2, 0.0


def crop_problems(jitter: float, resize: float) -> list[str]:
    """What is wrong with Darknet's `jitter` and `resize` for `DarknetCrop` (empty: nothing): a
    resize must be > 0, and a crop must keep part of the image, which needs
    jitter + (1 - 1 / resize) / 2 < 0.5 (each side may lose that fraction)."""
    if not resize > 0:
        return [f"resize={resize:g}: expected a zoom factor > 0 (1: none)"]
    if not jitter >= 0:
        return [f"jitter={jitter:g}: expected a fraction >= 0"]
    if jitter + max(_resize_crop_range(resize)[1], 0.0) >= 0.5:
        return [f"jitter={jitter:g} with resize={resize:g} can crop an image away; training needs jitter < 0.5 "
                f"and jitter + (1 - 1 / resize) / 2 < 0.5"]
    return []


def build_plain_transform(size: int, letterbox: bool, min_box_size: float = PLAIN_MIN_BOX_SIZE) -> A.Compose:
    """Fit to `size` x `size` (resize or letterbox) without any augmentation."""
    return A.Compose(_fit_steps(size, letterbox), bbox_params=_bbox_params(min_box_size))


def build_train_transform(config: AugmentConfig) -> A.Compose:
    """One image's augmentation, as the module docstring lists it (`config.mosaic` is the dataset's;
    `config.min_box_size` too, which it applies to the output)."""
    steps = [
        DarknetCrop(config.jitter, config.resize, config.letterbox),
        A.Resize(config.size, config.size, interpolation=cv2.INTER_LINEAR),
        A.HorizontalFlip(p=config.flip),
        DarknetColour(config.hue, config.saturation, config.exposure),
    ]
    return A.Compose(steps, bbox_params=_bbox_params(0.0))


def build_mosaic_transform(config: AugmentConfig) -> A.Compose:
    """A 2x2 mosaic of four images already augmented to `size` x `size` (the first as `image`, the
    other three as `mosaic_metadata` dicts of image, bboxes and class_labels)."""
    if not hasattr(A, "Mosaic"):
        raise ValueError(f"mosaic needs albumentations.Mosaic, which albumentations {A.__version__} "
                         f"lacks; upgrade albumentations or set mosaic to 0")
    mosaic = A.Mosaic(grid_yx=(2, 2), target_size=(config.size, config.size), cell_shape=(config.size, config.size),
                      center_range=MOSAIC_CENTRE_RANGE, fill=FILL, p=1.0)
    return A.Compose([mosaic], bbox_params=_bbox_params(0.0))


def _fit_steps(size: int, letterbox: bool) -> list:
    if not letterbox:
        return [A.Resize(size, size, interpolation=cv2.INTER_LINEAR)]
    return [A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=FILL)]


def _bbox_params(min_box_size: float) -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["class_labels"], min_width=min_box_size,
                        min_height=min_box_size, clip=True, filter_invalid_bboxes=True)
