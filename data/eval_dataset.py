"""Images for inference: read, fitted to the network input, with what is needed to map boxes back.

`InferenceDataset(paths, image_ids, net_w, net_h, letterbox)[i]` returns
`(image Tensor[3, net_h, net_w] float RGB in [0, 1], ImageMeta)`; `collate_inference` stacks a
batch into `(Tensor[B, 3, net_h, net_w], list[ImageMeta])`. `InferenceDataset.from_source` reads
the images of a `DetectionSource`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.geometry import FitTransform, fit_transform, place_on_canvas, resize_content
from data.sources import DetectionSource

# Stored pixel order, as Darknet and the COCO annotations: EXIF orientation is not applied.
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


@dataclass(frozen=True)
class ImageMeta:
    """Where an input image came from and how it was fitted to the network."""

    image_id: int
    path: Path
    transform: FitTransform


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 ndarray[H, W, 3] RGB (EXIF orientation ignored)."""
    image = cv2.imread(str(path), _IMREAD_FLAGS)
    if image is None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: image not found")
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


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
                 net_w: int, net_h: int, letterbox: bool):
        self.paths = [Path(p) for p in paths]
        self.image_ids = list(range(1, len(self.paths) + 1)) if image_ids is None else list(image_ids)
        if len(self.image_ids) != len(self.paths):
            raise ValueError(f"got {len(self.paths)} paths but {len(self.image_ids)} image ids")
        self.net_w, self.net_h, self.letterbox = net_w, net_h, letterbox

    @classmethod
    def from_source(cls, source: DetectionSource, net_w: int, net_h: int, letterbox: bool) -> "InferenceDataset":
        return cls([r.path for r in source.records], [r.image_id for r in source.records], net_w, net_h, letterbox)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ImageMeta]:
        image, transform = to_network_input(read_rgb(self.paths[index]), self.net_w, self.net_h, self.letterbox)
        return image, ImageMeta(self.image_ids[index], self.paths[index], transform)


def collate_inference(batch: list[tuple[torch.Tensor, ImageMeta]]) -> tuple[torch.Tensor, list[ImageMeta]]:
    """Stack images into Tensor[B, 3, net_h, net_w]; metas stay a list."""
    images, metas = zip(*batch)
    return torch.stack(images), list(metas)
