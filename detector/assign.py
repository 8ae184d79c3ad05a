"""Target assignment for one YOLO head, as Darknet's `yolo_layer.c` does it.

Each ground-truth box goes to the anchor, over *all* anchors of the `[yolo]` section, whose shape
best matches it (IoU of the two boxes centred on the same point, so only width and height count).
The head whose `mask` holds that anchor predicts the box from the grid cell containing its centre.
Every *other* anchor of the head whose shape IoU with the box exceeds `iou_thresh` predicts it too
(yolov4 uses 0.213; `iou_thresh >= 1` turns this off). Every claim is kept: where several boxes
claim the same (image, anchor, cell) slot, the slot appears once per box, and the loss merges them
as Darknet does (`detector.loss`: the box deltas add up, averaged over the boxes' classes where
`iou_thresh` < 1, and the class target is multi-hot). Such slots are not rare on small models: 5.3%
of yolo-fastest-1.1's claims on coco128 at 320 share a slot (without augmentation; a review
measured it), 0.7% of yolov4's at 608.

Reference: AlexeyAB/darknet, src/yolo_layer.c (`process_batch`, the truth loop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Assignment:
    """The claims of one head; all fields are `Tensor[P]` (int64), one row per (box, slot) claim.

    `batch`, `anchor` (position in the head's `mask`), `grid_y`, `grid_x` index the head's output
    `Tensor[B, A, H, W, 5 + C]`; `target` is the row of the `targets` tensor that claims the slot.
    A slot claimed by several boxes appears once per box.
    """

    batch: Tensor
    anchor: Tensor
    grid_y: Tensor
    grid_x: Tensor
    target: Tensor

    def __len__(self) -> int:
        return int(self.target.numel())

    def flat_slots(self, num_anchors: int, grid_hw: tuple[int, int]) -> Tensor:
        """Tensor[P]: each claim's slot as an index into the head's output flattened to
        `[B * A * H * W, 5 + C]`."""
        grid_h, grid_w = grid_hw
        return ((self.batch * num_anchors + self.anchor) * grid_h + self.grid_y) * grid_w + self.grid_x


def anchor_shape_iou(box_wh: Tensor, anchor_wh: Tensor) -> Tensor:
    """IoU of boxes and anchors placed on a common centre.

    Args:
        box_wh: Tensor[N, 2], widths and heights (any unit shared with `anchor_wh`).
        anchor_wh: Tensor[M, 2].

    Returns:
        Tensor[N, M].
    """
    inter = torch.minimum(box_wh[:, None, :], anchor_wh[None, :, :]).prod(dim=-1)  # [N, M]
    area_box = box_wh.prod(dim=-1)[:, None]
    area_anchor = anchor_wh.prod(dim=-1)[None, :]
    return inter / (area_box + area_anchor - inter).clamp(min=torch.finfo(box_wh.dtype).tiny)


def assign_targets(targets: Tensor, all_anchors: Tensor, mask: list[int], grid_hw: tuple[int, int],
                   input_hw: tuple[int, int], iou_thresh: float) -> Assignment:
    """Positive slots of one head for a batch of ground-truth boxes.

    Args:
        targets: Tensor[N, 6] = (batch_index, class, cx, cy, w, h), box normalised to the input.
        all_anchors: Tensor[K, 2], every anchor of the `[yolo]` section in input pixels.
        mask: the indices into `all_anchors` this head predicts with (its A anchors, in order).
        grid_hw: (H, W) of the head's output grid.
        input_hw: (height, width) of the network input in pixels.
        iou_thresh: extra anchors of this head whose shape IoU exceeds it are positive too.

    Returns:
        The head's `Assignment`, one row per claim: per box, its best anchor first (if this head
        has it), then its other anchors above `iou_thresh` in mask order, as Darknet visits them.
    """
    device = targets.device
    grid_h, grid_w = grid_hw
    scale = torch.tensor([input_hw[1], input_hw[0]], dtype=torch.float32, device=device)
    box_wh = targets[:, 4:6].float() * scale  # [N, 2] input pixels
    shape_iou = anchor_shape_iou(box_wh, all_anchors.to(device=device, dtype=torch.float32))  # [N, K]
    best = shape_iou.argmax(dim=1)  # first maximum on ties, as Darknet's strict `>`

    mask_t = torch.as_tensor(mask, dtype=torch.long, device=device)  # [A]
    is_best = best[:, None] == mask_t[None, :]  # [N, A]
    is_extra = (shape_iou[:, mask_t] > iou_thresh) & ~is_best if iou_thresh < 1.0 else torch.zeros_like(is_best)
    # Darknet handles truth t's best anchor first, then its extra anchors in anchor order.
    rank = torch.where(is_best, 0, 1 + torch.arange(len(mask), device=device)[None, :])
    target_idx, anchor_pos = torch.nonzero(is_best | is_extra, as_tuple=True)
    order = target_idx * (len(mask) + 1) + rank[target_idx, anchor_pos]
    sort = torch.argsort(order)
    target_idx, anchor_pos = target_idx[sort], anchor_pos[sort]

    rows = targets[target_idx]
    batch = rows[:, 0].long()
    grid_x = (rows[:, 2] * grid_w).long().clamp(0, grid_w - 1)
    grid_y = (rows[:, 3] * grid_h).long().clamp(0, grid_h - 1)
    return Assignment(batch, anchor_pos, grid_y, grid_x, target_idx)

