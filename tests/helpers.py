"""Small models shared by the test modules (import as `from helpers import ...`)."""
from __future__ import annotations

import cv2
import pytest
from torch import nn

needs_darknet_importer = pytest.mark.skipif(
    not hasattr(getattr(cv2, "dnn", None), "readNetFromDarknet"),
    reason=f"OpenCV {cv2.__version__} has no Darknet importer (pyproject.toml asks for opencv-python<5)")
"""For tests that read Darknet files with OpenCV, our independent reference (OpenCV 5 dropped it)."""


def small_convnet() -> nn.Module:
    """Conv (with BatchNorm), conv, linear: three prunable weights of 216, 576 and 160 entries,
    for 3-channel inputs of any size and 5 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 5),
    )
