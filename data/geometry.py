"""Fit an image to the network input, and map boxes back to the original image.

Two modes, as Darknet's `[net] letter_box`:
- plain resize (letter_box=0): the image is stretched to net_w x net_h.
- letterbox (letter_box=1): the image is scaled to fit, keeping its aspect ratio, with Darknet's
  integer arithmetic for the scaled size (`letterbox_image` in image.c), and centred on a grey
  (0.5) canvas at offset ((net_w - new_w) // 2, (net_h - new_h) // 2).

`boxes_to_original` is the exact inverse of the mapping the image went through. (Darknet's own
`correct_yolo_boxes` uses the non-integer offset (net_w - new_w) / 2, which is off from where the
image was pasted by half a pixel when the difference is odd; we use the real offset.)
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

LETTERBOX_FILL = 0.5  # Darknet fills the letterbox border with 0.5 (grey) in [0, 1] units


@dataclass(frozen=True)
class FitTransform:
    """How an original image of `orig_w` x `orig_h` was placed on the `net_w` x `net_h` input.

    The content occupies [pad_x, pad_x + new_w) x [pad_y, pad_y + new_h) of the input, so a point
    (x, y) of the original image lands at (x * new_w / orig_w + pad_x, y * new_h / orig_h + pad_y).
    """

    orig_w: int
    orig_h: int
    net_w: int
    net_h: int
    new_w: int
    new_h: int
    pad_x: int
    pad_y: int

    @property
    def letterboxed(self) -> bool:
        return (self.new_w, self.new_h) != (self.net_w, self.net_h)


def fit_transform(orig_w: int, orig_h: int, net_w: int, net_h: int, letterbox: bool) -> FitTransform:
    """The placement of an `orig_w` x `orig_h` image on the network input (see module doc)."""
    if min(orig_w, orig_h, net_w, net_h) <= 0:
        raise ValueError(f"image and network sizes must be positive, found image {orig_w}x{orig_h}, "
                         f"network {net_w}x{net_h}")
    if not letterbox:
        return FitTransform(orig_w, orig_h, net_w, net_h, net_w, net_h, 0, 0)
    if net_w / orig_w < net_h / orig_h:
        new_w, new_h = net_w, (orig_h * net_w) // orig_w
    else:
        new_w, new_h = (orig_w * net_h) // orig_h, net_h
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    return FitTransform(orig_w, orig_h, net_w, net_h, new_w, new_h, (net_w - new_w) // 2, (net_h - new_h) // 2)


def resize_content(image: np.ndarray, transform: FitTransform) -> np.ndarray:
    """Resize `image` (ndarray[orig_h, orig_w, C]) to the content size ndarray[new_h, new_w, C].

    Bilinear (cv2.INTER_LINEAR), as OpenCV's blobFromImage and Darknet built with OpenCV.
    """
    if image.shape[:2] != (transform.orig_h, transform.orig_w):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, the transform expects "
                         f"{transform.orig_w}x{transform.orig_h}")
    if (transform.new_w, transform.new_h) == (transform.orig_w, transform.orig_h):
        return image
    return cv2.resize(image, (transform.new_w, transform.new_h), interpolation=cv2.INTER_LINEAR)


def place_on_canvas(content: np.ndarray, transform: FitTransform, fill: float = LETTERBOX_FILL) -> np.ndarray:
    """Paste content ndarray[C, new_h, new_w] into an ndarray[C, net_h, net_w] filled with `fill`.

    Returns `content` itself when it already covers the whole input (plain resize).
    """
    if not transform.letterboxed:
        return content
    canvas = np.full((content.shape[0], transform.net_h, transform.net_w), fill, dtype=content.dtype)
    canvas[:, transform.pad_y:transform.pad_y + transform.new_h,
           transform.pad_x:transform.pad_x + transform.new_w] = content
    return canvas


def boxes_to_original(boxes: torch.Tensor, transform: FitTransform) -> torch.Tensor:
    """Map boxes Tensor[N, 4] xyxy from network-input pixels to original-image pixels.

    The result is clipped to the original image [0, orig_w] x [0, orig_h].
    """
    scale = boxes.new_tensor([transform.new_w / transform.orig_w, transform.new_h / transform.orig_h] * 2)
    offset = boxes.new_tensor([transform.pad_x, transform.pad_y] * 2)
    original = (boxes - offset) / scale
    original[:, 0::2] = original[:, 0::2].clamp(0, transform.orig_w)
    original[:, 1::2] = original[:, 1::2].clamp(0, transform.orig_h)
    return original


def boxes_to_network(boxes: torch.Tensor, transform: FitTransform) -> torch.Tensor:
    """Map boxes Tensor[N, 4] xyxy from original-image pixels to network-input pixels (no clipping)."""
    scale = boxes.new_tensor([transform.new_w / transform.orig_w, transform.new_h / transform.orig_h] * 2)
    offset = boxes.new_tensor([transform.pad_x, transform.pad_y] * 2)
    return boxes * scale + offset
