"""Target assignment for one YOLO head, as Darknet's `yolo_layer.c` does it.

Each ground-truth box goes to the anchor, over *all* anchors of the `[yolo]` section, whose shape
best matches it (IoU of the two boxes centred on the same point, so only width and height count).
The head whose `mask` holds that anchor predicts the box from the grid cell containing its centre.
Every *other* anchor of the head whose shape IoU with the box exceeds `iou_thresh` predicts it too
(yolov4 uses 0.213; `iou_thresh >= 1` turns this off). Where several boxes claim the same
(image, anchor, cell) slot, the last one wins, for the class target (one-hot) and the box.
Darknet differs there: a later box only sets its own class's target to 1 and keeps the earlier
boxes' classes (`delta_yolo_class` returns early once the slot has deltas), so the target is
multi-hot; and its box deltas add up over the boxes (`delta_yolo_box` with accumulate). Such
slots are rare: 0.4% of the positive slots of yolov4 on coco128's training images, 1.5% of
yolo-fastest's (without augmentation; a review measured it).

Reference: AlexeyAB/darknet, src/yolo_layer.c (`process_batch`, the truth loop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Assignment:
    """The positive slots of one head; all fields are `Tensor[P]` (int64), one row per positive.

    `batch`, `anchor` (position in the head's `mask`), `grid_y`, `grid_x` index the head's output
    `Tensor[B, A, H, W, 5 + C]`; `target` is the row of the `targets` tensor the slot learns.
    """

    batch: Tensor
    anchor: Tensor
    grid_y: Tensor
    grid_x: Tensor
    target: Tensor

    def __len__(self) -> int:
        return int(self.target.numel())


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
        The head's `Assignment`, one row per distinct (image, anchor, cell) slot.
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
    keep = _last_claim_per_slot(((batch * len(mask) + anchor_pos) * grid_h + grid_y) * grid_w + grid_x)
    return Assignment(batch[keep], anchor_pos[keep], grid_y[keep], grid_x[keep], target_idx[keep])


def _last_claim_per_slot(slot: Tensor) -> Tensor:
    """Indices (ascending) of the last occurrence of each distinct value of `slot` (Tensor[P])."""
    if slot.numel() == 0:
        return slot.new_zeros(0)
    unique, inverse = torch.unique(slot, return_inverse=True)
    position = torch.arange(slot.numel(), device=slot.device)
    last = torch.full_like(unique, -1).scatter_reduce(0, inverse, position, reduce="amax")
    return torch.sort(last).values
