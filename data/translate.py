"""Random translation of one image, the pad-and-crop augmentation of the classifier datasets."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_translate(image: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift `image` [C, H, W] by a random -max_shift..max_shift pixels in y and in x, filling with 0.

    Zero-pads by `max_shift` on every side and crops H x W back at a uniform random offset, drawn
    from `generator` (None: torch's global generator).
    (torchvision's `v2.RandomCrop(size, padding=max_shift)` crops alike but draws from torch's
    global generator only; here one sample's seed, through `generator`, decides its crop.)
    """
    height, width = image.shape[-2:]
    padded = F.pad(image, (max_shift, max_shift, max_shift, max_shift))
    top, left = (int(v) for v in torch.randint(0, 2 * max_shift + 1, (2,), generator=generator))
    return padded[..., top:top + height, left:left + width]
