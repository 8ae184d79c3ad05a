"""MNIST from its original IDX gzip files (Yann LeCun's format), read with gzip + numpy.

IDX layout: two zero bytes, a dtype code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension, then the data in C order. MNIST's images file has magic 0x00000803
(uint8, 3 dims: N x 28 x 28) and its labels file 0x00000801 (uint8, 1 dim: N).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.seeded_batches import seeded_item
from data.translate import random_translate

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in .gz) into an array of its shape.

    Raises ValueError naming the file when the magic number, dtype code or size is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read IDX data ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: expected an IDX header of at least 4 bytes, found {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: expected IDX magic number 0x{expected_magic:08X}, found 0x{magic:08X}")
    dtype_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or dtype_code not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{magic:08X})")
    header_size = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[dtype_code])
    expected_bytes = header_size + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_bytes:
        raise ValueError(f"{path}: header says shape {shape} ({expected_bytes} bytes in all), "
                         f"found {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def find_idx_file(root: Path, stem: str) -> Path:
    """`root/stem.gz`, else `root/stem`; FileNotFoundError naming both when neither exists."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: MNIST file {stem}.gz (or {stem}) not found")


def mnist_files(root: str | os.PathLike, split: str = "train") -> tuple[Path, Path]:
    """The images and labels files of one MNIST split in `root`, found without reading them."""
    if split not in SPLIT_FILES:
        raise ValueError(f"MNIST split must be one of {sorted(SPLIT_FILES)}, found {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: MNIST directory not found")
    images_path, labels_path = (find_idx_file(root, stem) for stem in SPLIT_FILES[split])
    return images_path, labels_path


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Read one MNIST split from `root` (`mnist_files`, then `read_mnist_files`)."""
    return read_mnist_files(*mnist_files(root, split))


def read_mnist_files(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check one split's IDX files.

    Returns:
        images: uint8 Tensor[N, 28, 28]; labels: int64 Tensor[N] with values 0..9.
    """
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected images of 28x28, found {images.shape[1:]}")
    if len(images) != len(labels):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: expected labels 0..9, found {int(labels.max())}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class MNISTDataset(Dataset):
    """In-memory MNIST: item i is (float Tensor[1, 28, 28] normalised by mean/std, int label).

    Args:
        images: uint8 Tensor[N, H, W]; labels: int64 Tensor[N].
        mean, std: statistics on the [0, 1] scale.
        max_shift: translate each image by a random -max_shift..max_shift px in x and y (black
            fill), for training; 0 (the default) leaves the images as they are.

    Item `i` shifts from torch's global generator; item `(i, seed, side)`, as `data.SeededBatchSampler`
    yields, from `seed` alone (`side` must be None), so that the DataLoader's workers do not decide it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: float = MNIST_MEAN, std: float = MNIST_STD, max_shift: int = 0):
        if images.ndim != 3 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images [N, H, W] and N labels, found {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0 pixels, found {max_shift}")
        self.images = images
        self.labels = labels
        self.mean = mean
        self.std = std
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.images)

    @property
    def augments(self) -> bool:
        """Whether items are drawn at random (so a loader should hand them seeds)."""
        return self.max_shift > 0

    def __getitem__(self, item: int | tuple[int, int, None]) -> tuple[torch.Tensor, int]:
        index, generator = seeded_item(item)
        image = self.images[index].float().div_(255.0).unsqueeze_(0)
        if self.max_shift:
            image = random_translate(image, self.max_shift, generator)
        return image.sub_(self.mean).div_(self.std), int(self.labels[index])
