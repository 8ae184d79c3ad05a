"""Our forward pass against OpenCV's Darknet importer (`cv2.dnn.readNetFromDarknet`), an
implementation we did not write.

Where OpenCV differs from Darknet, and how the comparison allows for it:
- Batch norm: OpenCV normalises with eps 1e-6, Darknet (and we) with 1e-5. The file OpenCV reads
  has every rolling variance raised by 9e-6, so both compute sqrt(var + 1e-5).
- Output: each `[yolo]` layer gives rows ordered (row, col, anchor) of cx, cy, w, h divided by the
  input size, objectness, then objectness x class probability set to 0 where not above the
  layer's `thresh` (0.2 by default). Boxes and objectness are compared everywhere, class scores
  where OpenCV kept them; where it zeroed them ours must not be above 0.2.
Relative difference: |ours - opencv| / max(|opencv|, 1e-6); the largest must be <= 1e-4.

Random weights (the cfgs have no public weights here): conv weights uniform with variance
1/fan_in, batch-norm gamma in [0.5, 1.5] and beta in [-0.2, 0.2], and rolling statistics taken
from the test image itself (one training-mode pass), the variance raised by mean^2 so that no
channel is a near-constant that would amplify rounding differences through 100+ layers.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import detector
from detector.layers import ConvBlock
from helpers import needs_darknet_importer

pytestmark = needs_darknet_importer

DARKNET_BN_EPS = 1e-5    # blas.c normalize_cpu: sqrt(variance + .00001f)
OPENCV_BN_EPS = 1e-6     # darknet_io.cpp setBatchNorm
OPENCV_YOLO_THRESH = 0.2
TOLERANCE = 1e-4
IMAGE = ("coco128", "images", "val2017", "000000000139.jpg")


def input_image(cfg_path, size: int) -> torch.Tensor:
    """Tensor[1, 3, size, size] RGB in [0, 1]: a coco128 image when present, else noise."""
    path = cfg_path.parents[1].joinpath(*IMAGE)
    if path.exists():
        bgr = cv2.resize(cv2.imread(str(path)), (size, size), interpolation=cv2.INTER_LINEAR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous()
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomize(model: detector.DarknetModel, image: torch.Tensor, seed: int) -> None:
    """Random weights that keep activations O(1); see the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    batchnorms = []
    for block in model.layers:
        if not isinstance(block, ConvBlock):
            continue
        weight = block.conv.weight
        bound = math.sqrt(3.0 / weight[0].numel())
        weight.uniform_(-bound, bound, generator=gen)
        if isinstance(block.bn, nn.BatchNorm2d):
            block.bn.weight.uniform_(0.5, 1.5, generator=gen)
            block.bn.bias.uniform_(-0.2, 0.2, generator=gen)
            block.bn.reset_running_stats()
            block.bn.momentum = None          # cumulative average: one pass = batch statistics
            batchnorms.append(block.bn)
        else:
            block.conv.bias.uniform_(-0.2, 0.2, generator=gen)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    model(image)
    model.eval()
    for bn in batchnorms:
        bn.running_var += bn.running_mean.square()
        bn.momentum = 0.01


@torch.no_grad()
def write_for_opencv(model: detector.DarknetModel, path) -> None:
    """Write the model's weights with the variances raised for OpenCV's eps; model unchanged."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [bn.running_var.clone() for bn in batchnorms]
    for bn in batchnorms:
        bn.running_var += DARKNET_BN_EPS - OPENCV_BN_EPS
    detector.write_weights(path, model)
    for bn, var in zip(batchnorms, saved):
        bn.running_var.copy_(var)


def opencv_forward(cfg_path, weights_path, image: torch.Tensor) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromDarknet(str(cfg_path), str(weights_path))
    if hasattr(net, "enableWinograd"):
        net.enableWinograd(False)             # exact convolutions, as ours
    names = sorted(net.getUnconnectedOutLayersNames(), key=lambda n: int(n.rsplit("_", 1)[1]))
    net.setInput(image.numpy())
    return list(net.forward(names))


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    if ours.size == 0:
        return 0.0
    return float((np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-6)).max())


def assert_matches_opencv(ours: list[torch.Tensor], theirs: list[np.ndarray], size: int) -> None:
    assert len(ours) == len(theirs)
    for index, (out, ref) in enumerate(zip(ours, theirs)):
        rows = out[0].permute(1, 2, 0, 3).reshape(-1, out.shape[-1]).numpy()   # (H*W*A, 5+C)
        assert rows.shape == ref.shape, f"head {index}"
        scores = rows[:, 4:5] * rows[:, 5:]
        kept = ref[:, 5:] > 0
        differences = {
            "boxes": relative_difference(rows[:, :4] / size, ref[:, :4]),
            "objectness": relative_difference(rows[:, 4], ref[:, 4]),
            "class scores": relative_difference(scores[kept], ref[:, 5:][kept]),
        }
        assert max(differences.values()) <= TOLERANCE, f"head {index}: {differences}"
        assert kept.sum() > 0, f"head {index}: OpenCV kept no class score to compare"
        assert scores[~kept].max() <= OPENCV_YOLO_THRESH * (1 + TOLERANCE), f"head {index}"


@pytest.mark.parametrize("name, size", [
    ("yolov4-tiny", 224), ("yolov3-tiny", 224),          # route groups; maxpool size=2 stride=1
    ("yolov4", 128), ("yolov3", 128), ("yolov4-csp", 128),   # big: small input, still 3 heads
])
def test_random_weights_match_opencv(shared_data, tmp_path, name, size):
    cfg = shared_data("darknet", f"{name}.cfg")
    image = input_image(cfg, size)
    model = detector.load_darknet(cfg)
    randomize(model, image, seed=0)
    write_for_opencv(model, tmp_path / "opencv.weights")
    with torch.no_grad():
        ours = model(image)
    assert_matches_opencv(ours, opencv_forward(cfg, tmp_path / "opencv.weights", image), size)


def test_real_yolo_fastest_matches_opencv(shared_data, tmp_path):
    """The real weights; the batch-norm-folded inference copy must match as well."""
    cfg = shared_data("darknet", "yolo-fastest-1.1.cfg")
    model = detector.load_darknet(cfg, shared_data("darknet", "yolo-fastest-1.1.weights"))
    image = input_image(cfg, 320)
    write_for_opencv(model, tmp_path / "opencv.weights")
    reference = opencv_forward(cfg, tmp_path / "opencv.weights", image)
    with torch.no_grad():
        assert_matches_opencv(model(image), reference, 320)
        assert_matches_opencv(detector.fused_for_inference(model)(image), reference, 320)
