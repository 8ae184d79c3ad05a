"""CIFAR-10 from class folders of images: `root/{train,test}/<class>/*.jpg` (or .png).

The images are decoded once (OpenCV, threaded) into one uint8 tensor held in memory; the dataset
then only indexes, crops and flips. Classes are the sub-folder names in sorted order, which for
CIFAR-10 is its canonical label order (airplane=0 ... truck=9).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.seeded_batches import seeded_item
from data.sources import images_below
from data.translate import random_translate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IMAGE_SIZE = 32
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def list_class_images(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their class indices and the sorted class names under `split_dir/<class>/`.

    As in torchvision's ImageFolder, a class's images may sit in sub-folders of its folder. Unlike
    ImageFolder, hidden files and folders (a name starting with ".", such as macOS's `._x.jpg` or
    `.ipynb_checkpoints`) are left out; images directly in `split_dir`, in no class folder, are left
    out with a warning.
    """
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: CIFAR split directory not found")
    entries = [entry for entry in split_dir.iterdir() if not entry.name.startswith(".")]
    class_names = sorted(entry.name for entry in entries if entry.is_dir())
    if not class_names:
        raise ValueError(f"{split_dir}: expected one sub-folder per class, found none")
    stray = sorted(entry.name for entry in entries if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        warnings.warn(f"{split_dir}: {len(stray)} image(s) in no class folder, left out (e.g. {stray[0]})",
                      stacklevel=2)
    paths, labels = [], []
    for index, name in enumerate(class_names):
        files = sorted(images_below(split_dir / name, IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"{split_dir / name}: expected images ({', '.join(IMAGE_SUFFIXES)}), found none")
        paths.extend(files)
        labels.extend([index] * len(files))
    return paths, labels, class_names


def decode_rgb32(path: Path) -> np.ndarray:
    """Decode one image file to uint8 RGB [32, 32, 3]; ValueError naming the file otherwise."""
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a decodable image")
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{path}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} image, found "
                         f"{image.shape[1]}x{image.shape[0]}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_cifar_folder(root: str | os.PathLike, split: str = "train", workers: int = 4,
                      classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every image of `root/split` once.

    Args:
        classes: the class folders expected (e.g. `CIFAR10_CLASSES`), checked before any decoding;
            None takes whatever folders are there.
    Returns:
        images: uint8 Tensor[N, 3, 32, 32] (RGB); labels: int64 Tensor[N]; class_names: list[str].
    Raises:
        ValueError: `classes` given and the folders differ (the labels would shift silently).
    """
    return decode_listing(list_cifar_split(root, split, classes), workers)


def list_cifar_split(root: str | os.PathLike, split: str = "train",
                     classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """`list_class_images` of `root/split`, checked against `classes` (when given) before any decoding."""
    paths, labels, class_names = list_class_images(Path(root) / split)
    if classes is not None and class_names != list(classes):
        missing = sorted(set(classes) - set(class_names))
        unexpected = sorted(set(class_names) - set(classes))
        raise ValueError(f"{Path(root) / split}: expected the class folders {', '.join(classes)}, found "
                         f"{len(class_names)}: missing {missing}, unexpected {unexpected}")
    return paths, labels, class_names


def decode_listing(listing: tuple[list[Path], list[int], list[str]],
                   workers: int = 4) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode the images of a `list_cifar_split` listing: (uint8 images [N, 3, 32, 32], labels, class names)."""
    paths, labels, class_names = listing
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = list(pool.map(decode_rgb32, paths, chunksize=256))
    images = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64), class_names


def random_crop_flip(image: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation on one image [C, H, W]: zero-pad (black, before normalisation),
    random crop back to H x W, random horizontal flip; drawn from `generator` (None: torch's global one).
    """
    crop = random_translate(image, padding, generator)
    return crop.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop


class CIFARDataset(Dataset):
    """In-memory CIFAR images: item i is (float Tensor[3, 32, 32] normalised per channel, int label).

    Args:
        images: uint8 Tensor[N, 3, H, W]; labels: int64 Tensor[N].
        mean, std: per-channel statistics on the [0, 1] scale.
        augment: random crop (pad 4) + horizontal flip, for training.

    Item `i` augments from torch's global generator; item `(i, seed, side)`, as `data.SeededBatchSampler`
    yields, from `seed` alone (`side` must be None), so that the DataLoader's workers do not decide it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, float, float],
                 std: tuple[float, float, float], augment: bool = False):
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images [N, 3, H, W] and N labels, found {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    @property
    def augments(self) -> bool:
        """Whether items are drawn at random (so a loader should hand them seeds)."""
        return self.augment

    def __getitem__(self, item: int | tuple[int, int, None]) -> tuple[torch.Tensor, int]:
        index, generator = seeded_item(item)
        image = self.images[index].float().div_(255.0)
        if self.augment:
            image = random_crop_flip(image, generator=generator)
        return (image - self.mean) / self.std, int(self.labels[index])
