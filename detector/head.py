"""The `[yolo]` head: reshape a conv output per anchor, and decode it to boxes as Darknet does.

Darknet (AlexeyAB `src/yolo_layer.c`, `forward_yolo_layer` and `get_yolo_box`), for cell (col, row)
of a head with stride `s_px` (input pixels per cell), anchor (a_w, a_h) and `scale_x_y` = s:

- usual heads: the yolo layer applies the logistic to x, y, objectness and classes, then
  x' = s * sigmoid(tx) - (s - 1) / 2, and w = exp(tw) * a_w.
- `new_coords=1` heads: the conv before already applied the logistic to every channel, so the
  yolo layer applies none; x' = s * tx - (s - 1) / 2, and w = (2 * tw)^2 * a_w.

Then cx = (col + x') * s_px and cy = (row + y') * s_px, in input pixels.
"""
from __future__ import annotations

import torch
from torch import nn

from detector.cfg import YoloSection


class YoloHead(nn.Module):
    """One `[yolo]` layer.

    Attributes:
        num_classes: C.
        anchors: Tensor[A, 2], the anchors selected by `mask`, (w, h) in input pixels.
        all_anchors: Tensor[N, 2], every anchor of the section.
        mask: list[int], indices of `anchors` within `all_anchors`.
        stride: input pixels per grid cell (input size / head size), fixed by the architecture.
        scale_x_y: Darknet's `scale_x_y`.
        new_coords: whether the input is already logistic (`new_coords=1`).
        loss_options: dict of the `[yolo]` training options with Darknet's defaults.
    """

    def __init__(self, section: YoloSection, stride: float):
        super().__init__()
        self.num_classes = section.classes
        self.mask = list(section.mask)
        self.stride = stride
        self.scale_x_y = section.scale_x_y
        self.new_coords = section.new_coords
        self.loss_options = dict(section.loss_options)
        all_anchors = torch.tensor(section.anchors, dtype=torch.float32)
        self.register_buffer("all_anchors", all_anchors, persistent=False)
        self.register_buffer("anchors", all_anchors[self.mask].clone(), persistent=False)

    @property
    def num_anchors(self) -> int:
        return len(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x Tensor[B, A*(5+C), H, W], the output of the layer before.

        Returns: Tensor[B, A, H, W, 5+C]: in training mode the input per anchor, before the yolo
        layer's own activation; in eval mode `decode` of it.
        """
        raw = split_anchors(x, self.num_anchors)
        return raw if self.training else decode(raw, self)

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes}, mask={self.mask}, stride={self.stride:g}, "
                f"scale_x_y={self.scale_x_y:g}, new_coords={self.new_coords}")


def split_anchors(x: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """Tensor[B, A*K, H, W] -> contiguous Tensor[B, A, H, W, K] (Darknet channel order: A, K)."""
    batch, channels, height, width = x.shape
    per_anchor = channels // num_anchors
    per_anchor_maps = x.reshape(batch, num_anchors, per_anchor, height, width)
    return per_anchor_maps.permute(0, 1, 3, 4, 2).contiguous()


def decode(raw: torch.Tensor, head: YoloHead) -> torch.Tensor:
    """Decode one head's raw output into boxes and probabilities (differentiable).

    Args:
        raw: Tensor[B, A, H, W, 5+C], the head's training-mode output.
        head: the `YoloHead` it came from (anchors, stride, scale_x_y, new_coords).

    Returns:
        float32 Tensor[B, A, H, W, 5+C]: cx, cy, w, h in input pixels, objectness probability,
        then the class probabilities (not multiplied by objectness). Decoding is done in float32
        whatever the input dtype (half precision cannot hold pixel coordinates nor exp(tw)).
    """
    raw = raw.float()
    _, _, height, width, _ = raw.shape
    scale = head.scale_x_y
    if head.new_coords:
        activated = raw
        wh = (2.0 * raw[..., 2:4]).square()
    else:
        activated = raw.sigmoid()
        wh = raw[..., 2:4].exp()
    xy = activated[..., 0:2] * scale - 0.5 * (scale - 1.0)                      # [B,A,H,W,2]
    col = torch.arange(width, device=raw.device, dtype=torch.float32).view(1, 1, 1, width)
    row = torch.arange(height, device=raw.device, dtype=torch.float32).view(1, 1, height, 1)
    cx = (xy[..., 0] + col) * head.stride                                       # [B,A,H,W]
    cy = (xy[..., 1] + row) * head.stride
    wh = wh * head.anchors.view(1, -1, 1, 1, 2)
    return torch.cat((cx.unsqueeze(-1), cy.unsqueeze(-1), wh, activated[..., 4:]), dim=-1)
