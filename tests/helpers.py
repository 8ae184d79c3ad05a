"""Small models and Darknet cfgs shared by the test modules (import as `from helpers import ...`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import pytest

if TYPE_CHECKING:
    from torch import nn

# torch is imported inside the model builders: benchmarks/eval_speed.py loads the OpenCV reference
# of test_map_reference (which imports this module) into a child whose memory must not include torch.

needs_darknet_importer = pytest.mark.skipif(
    not hasattr(getattr(cv2, "dnn", None), "readNetFromDarknet"),
    reason=f"OpenCV {cv2.__version__} has no Darknet importer (pyproject.toml asks for opencv-python<5)")
"""For tests that read Darknet files with OpenCV, our independent reference (OpenCV 5 dropped it)."""


def small_convnet() -> nn.Module:
    """Conv (with BatchNorm), conv, linear: three prunable weights of 216, 576 and 160 entries,
    for 3-channel inputs of any size and 5 classes."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 5),
    )


def tiny_yolo_cfg(net_options: str, widths: tuple[int, ...], yolo_options: str = "") -> str:
    """Darknet cfg text of a small detector for the 4 classes of `data.synthetic`: `[net]` with
    `net_options` (one `key=value` per line), then per width a 3x3 conv (BatchNorm, leaky) and a
    2x2 max-pool, then a 1x1 conv and one `[yolo]` head (stride 2 ** len(widths)) with 3 anchors
    and `yolo_options` appended."""
    body = "".join(f"""
[convolutional]
batch_normalize=1
filters={filters}
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2
""" for filters in widths)
    head = """
[convolutional]
size=1
stride=1
pad=1
filters=27
activation=linear

[yolo]
mask=0,1,2
anchors=16,16, 24,24, 32,32
classes=4
num=3
"""
    return f"[net]\n{net_options}{body}{head}{yolo_options}"
