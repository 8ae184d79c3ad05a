"""Training batches for detection: a `DetectionSource` through augmentation, and the collate.

`DetectionTrainDataset(source, AugmentConfig(size, ...), augment=True)[i]` returns
`(image uint8 Tensor[3, S, S], labels float32 Tensor[n, 5])`, labels = (class, cx, cy, w, h)
normalised to the image; `collate_detection` turns a list of these into the batch of
docs/contracts.md: `images` float Tensor[B, 3, S, S] in [0, 1] and `targets` Tensor[N, 6] =
(batch_index, class, cx, cy, w, h). Indexed by `(i, seed, side)`, as `data.SeededBatchSampler`
does, it augments with that seed to side x side (multi-scale training: the image is augmented at
that side, as Darknet loads its images at the size it draws, where until 2026-11-27 it was
augmented at S and then resized).

Edge cases, each reported once:
- images without boxes are ordinary samples;
- crowd boxes are removed;
- boxes reaching outside their image are clipped to it, and boxes without area (after clipping)
  or not finite are dropped: ONE warning counts both and names a few images (a size limit, for
  boxes too small to learn from, applies to the augmented output: `AugmentConfig.min_box_size`);
- a missing image file is skipped (one warning names them); an image that fails to decode is
  replaced by another sample and named in a warning, once per file and process.

Randomness: each sample's augmentation, mosaic coin and mosaic partners come from one seed: the
one `SeededBatchSampler` drew in the main process, so that they do not depend on the DataLoader's
workers, or else one drawn here from torch's generator (the DataLoader seeds it per worker). The
engine checkpoints the generator, so either way they replay exactly on resume. The coin is tossed
before any partner is read: a sample without mosaic decodes one image, not four (1.18x more
samples/s for yolov4.cfg's mosaic probability 0.5 at 608 on coco128, 2-core CPU, one process,
interleaved runs of 48 samples, 2026-11-26). Each of a mosaic's four images is augmented on its
own, as Darknet does: 0.80-0.89x the samples/s of augmenting the whole mosaic once (the same
setting, 3 x 64 samples per run, two interleaved pairs beside other jobs, 2026-11-27).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from data.augment import (PLAIN_MIN_BOX_SIZE, AugmentConfig, build_mosaic_transform, build_plain_transform,
                          build_train_transform)
from data.eval_dataset import read_annotated_image
from data.seeded_batches import draw_seed
from data.sources import DetectionRecord, DetectionSource

if TYPE_CHECKING:
    import albumentations as A

MOSAIC_PARTNERS = 3
_NAMED_IN_WARNINGS = 5


class DetectionTrainDataset(Dataset):
    """Augmented training samples of a `DetectionSource` (see the module docstring).

    Args:
        source: the images and their ground truth.
        config: output size S, fit mode (letterbox or resize) and the augmentation settings.
        augment: False for no augmentation (only the fit to S x S).
    """

    def __init__(self, source: DetectionSource, config: AugmentConfig, augment: bool = True):
        self.class_names = list(source.class_names)
        self.records = clean_records(source.records)
        if not self.records:
            raise ValueError(f"DetectionTrainDataset: none of the {_images(len(source.records))} is usable")
        self.config = config
        self.augment = augment
        self.min_box_size = config.min_box_size if augment else PLAIN_MIN_BOX_SIZE
        self._transforms: dict[int, tuple[A.Compose, A.Compose | None]] = {}
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int, int | None]) -> tuple[Tensor, Tensor]:
        index, seed, side = item if isinstance(item, tuple) else (item, draw_seed(), None)
        side = self.config.size if side is None else int(side)
        transform, mosaic_transform = self._transforms_at(side)
        rng = np.random.default_rng(seed)
        index, image, boxes, classes = self._load(index)
        # One stream for all the transforms: set_random_seed(seed) gives each its own generator seeded
        # alike, so each drew the same numbers (the flip's coin was the x-shift and the brightness).
        stream = (np.random.default_rng([seed, 1]), random.Random(seed))
        transform.set_random_state(*stream)
        out = transform(image=image, bboxes=boxes, class_labels=classes)
        # The coin is tossed here rather than inside albumentations, so that the three partner
        # images are read and decoded only for the samples that use them.
        if mosaic_transform is not None and rng.random() < self.config.mosaic:
            # As Darknet: each of the four images is augmented on its own, then they are joined.
            picks = rng.integers(0, len(self.records), MOSAIC_PARTNERS)
            partners = [transform(**self._as_item(int(i))) for i in picks]
            mosaic_transform.set_random_state(*stream)
            out = mosaic_transform(**_item(out), mosaic_metadata=[_item(p) for p in partners])
        labels = _labels(out["bboxes"], out["class_labels"], out["image"].shape[:2])   # normalised
        labels = _at_least(labels, self.min_box_size, side)
        return torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))), labels

    def _transforms_at(self, side: int) -> tuple[A.Compose, A.Compose | None]:
        """(transform, mosaic transform or None) to `side` x `side`: a multi-scale batch's images are
        augmented at their side, as Darknet loads them at its new size, not enlarged afterwards."""
        if side not in self._transforms:
            if not self.augment:
                self._transforms[side] = (build_plain_transform(side, self.config.letterbox), None)
            else:
                config = replace(self.config, size=side)
                self._transforms[side] = (build_train_transform(config),
                                          build_mosaic_transform(config) if config.mosaic > 0 else None)
        return self._transforms[side]

    def _load(self, index: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(index actually read, uint8 RGB image, xyxy boxes in its pixels, classes), skipping
        undecodable images by moving on to the next index."""
        for step in range(len(self.records)):
            candidate = (index + step) % len(self.records)
            if candidate in self._unreadable:
                continue
            record = self.records[candidate]
            try:
                image = read_annotated_image(record.path, record.orientation, (record.width, record.height))
            except (ValueError, FileNotFoundError) as err:
                self._unreadable.add(candidate)
                warnings.warn(f"skipping unreadable training image {record.path}: {err}", stacklevel=2)
                continue
            return candidate, image, _boxes_in_image(record, image.shape[:2]), record.classes.copy()
        raise ValueError(f"DetectionTrainDataset: none of the {_images(len(self.records))} could be read")

    def _as_item(self, index: int) -> dict:
        _, image, boxes, classes = self._load(index)
        return {"image": image, "bboxes": boxes, "class_labels": classes}


def _item(out: dict) -> dict:
    """A transform's output as the next one's input."""
    return {"image": out["image"], "bboxes": out["bboxes"], "class_labels": out["class_labels"]}


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def clean_records(records: Sequence[DetectionRecord]) -> list[DetectionRecord]:
    """Records ready for training: missing images skipped, crowd boxes removed, boxes clipped to
    the image and degenerate ones dropped; one warning per kind of problem (see module doc)."""
    cleaned, missing, touched = [], [], []
    clipped = dropped = 0
    for record in records:
        if not record.path.is_file():
            missing.append(str(record.path))
            continue
        keep = ~record.iscrowd.astype(bool)
        boxes = record.boxes[keep].astype(np.float32)
        limit = np.array([record.width, record.height] * 2, np.float32)
        inside = np.clip(boxes, 0, limit)
        finite = np.isfinite(boxes).all(axis=1)
        valid = finite & ((inside[:, 2:] - inside[:, :2]) > 0).all(axis=1)   # sizes in pixels of the output, later
        changed = valid & (inside != boxes).any(axis=1)
        clipped += int(changed.sum())
        dropped += int((~valid).sum())
        if changed.any() or not valid.all():
            touched.append(record.path.name)
        cleaned.append(replace(record, boxes=inside[valid], classes=record.classes[keep][valid],
                               iscrowd=np.zeros(int(valid.sum()), bool), areas=None))
    if missing:
        warnings.warn(f"skipping {len(missing)} missing training image(s): {_some(missing)}", stacklevel=2)
    if clipped or dropped:
        warnings.warn(f"training labels: {clipped} box(es) clipped to their image, {dropped} box(es) without "
                      f"area after clipping, or not finite, dropped, in "
                      f"{len(touched)} image(s): {_some(touched)}", stacklevel=2)
    return cleaned


def collate_detection(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack samples into (images float Tensor[B, 3, S, S] in [0, 1], targets Tensor[N, 6])."""
    images = torch.stack([image for image, _ in batch]).float().div_(255.0)
    targets = [torch.cat([labels.new_full((len(labels), 1), index), labels], dim=1)
               for index, (_, labels) in enumerate(batch)]
    return images, torch.cat(targets)


class MultiScaleCollate:
    """Deprecated: `SeededBatchSampler(sides=...)` draws each batch's side in the main process, so
    that it does not depend on the DataLoader's workers. `collate_detection`, then a bilinear resize
    of the batch to a side drawn from `sizes` with torch's generator."""

    def __init__(self, sizes: Sequence[int]):
        warnings.warn("MultiScaleCollate is deprecated: use data.SeededBatchSampler(sides=...)", DeprecationWarning,
                      stacklevel=2)
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or any(s <= 0 or s % 32 for s in self.sizes):
            raise ValueError(f"MultiScaleCollate: sizes must be positive multiples of 32, found {list(sizes)}")

    def __call__(self, batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images, targets = collate_detection(batch)
        side = self.sizes[int(torch.randint(len(self.sizes), ()))]
        if images.shape[-1] != side or images.shape[-2] != side:
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        return images, targets


def _at_least(labels: Tensor, pixels: float, side: int) -> Tensor:
    """The rows of `labels` (Tensor[n, 5]: class, cx, cy, w, h normalised to `side`) whose w and h
    are at least `pixels` (within float32's rounding: a box of exactly that size stays)."""
    limit = pixels - 1e-3
    return labels[(labels[:, 3] * side >= limit) & (labels[:, 4] * side >= limit)]


def multi_scale_sizes(size: int, coefficient: float = 1.4) -> list[int]:
    """Multiples of 32 within [size / coefficient, size * coefficient], always incl. size: the sides
    `SeededBatchSampler` draws from, uniformly, for multi-scale training. Darknet's `[yolo] random=1`
    draws a factor in [1/1.4, 1.4] instead and rounds the side up, to one more multiple of 32, with
    smaller sides that round above `size` set to `size`: 480-896 at 608, half of the draws 608."""
    if not coefficient >= 1:
        raise ValueError(f"multi_scale_sizes: coefficient must be >= 1, found {coefficient}")
    first, last = int(np.ceil(size / coefficient / 32)), int(size * coefficient // 32)
    return sorted({32 * k for k in range(max(first, 1), last + 1)} | {size})


def _boxes_in_image(record: DetectionRecord, image_hw: tuple[int, int]) -> np.ndarray:
    """The record's boxes in the pixels of the decoded image (rescaled if its size differs)."""
    height, width = image_hw
    if (width, height) == (record.width, record.height):
        return record.boxes.copy()
    scale = np.array([width / record.width, height / record.height] * 2, np.float32)
    return np.clip(record.boxes * scale, 0, np.array([width, height] * 2, np.float32))


def _labels(bboxes, class_labels, image_hw: tuple[int, int]) -> Tensor:
    """albumentations output -> float32 Tensor[n, 5] of (class, cx, cy, w, h) normalised."""
    boxes = np.asarray(bboxes, np.float32).reshape(-1, 4)
    height, width = image_hw
    scale = np.array([width, height, width, height], np.float32)
    boxes = np.clip(boxes / scale, 0.0, 1.0)
    centre, extent = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    classes = np.asarray(class_labels, np.float32).reshape(-1, 1)
    return torch.from_numpy(np.concatenate([classes, centre, extent], axis=1))


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED_IN_WARNINGS])
    return shown + (f" and {len(names) - _NAMED_IN_WARNINGS} more" if len(names) > _NAMED_IN_WARNINGS else "")
