"""The YOLO detection loss with the semantics of Darknet's `[yolo]` layer (AlexeyAB/darknet).

Per head, with its `[yolo]` options (`head.loss_options`):
- **Assignment** (`detector.assign`): each box to its best-shaped anchor over all anchors, plus
  this head's other anchors with shape IoU > `iou_thresh`.
- **Box**: `iou_loss` (ciou, giou, diou, iou or mse) between the decoded prediction and the box,
  times `iou_normalizer`, for every box at every slot it claims. A slot claimed by several boxes
  sums their box terms (Darknet accumulates the box deltas) and, where `iou_thresh` < 1, divides
  the sum by the number of classes among them (`averages_yolo_deltas`, which Darknet runs only
  then). Darknet counts the classes whose delta is positive, which with `label_smooth_eps` takes
  in every class scored below eps / 2, nearly all of them once class scores are low: it then
  divides the box delta of every claimed slot by about the number of classes (80x on COCO, by a
  review's reimplementation). We count the boxes' classes; no shipped cfg sets both options.
- **Objectness**: target 1 at claimed slots, 0 elsewhere, except that a prediction is left out
  whose decoded box has IoU > `ignore_thresh` with some box of its image while one of its class
  probabilities exceeds 0.25 (`compare_yolo_class`); times `obj_normalizer`. With
  `objectness_smooth` (yolov4-csp's last two heads), every prediction, claimed or not, is trained
  towards that best IoU where it exceeds `ignore_thresh` and towards 0 elsewhere: Darknet sets
  every prediction's objectness delta first and lets a claim replace it only where it is exactly 0,
  which a logistic output never gives, so a claimed slot is not trained towards 1.
- **Classes**: at each claimed slot, target 1 for the class of every box that claims it, 0 for the
  others (multi-hot, as `delta_yolo_class` leaves it; smoothed to y(1 - eps) + eps/2 by
  `label_smooth_eps`). `cls_normalizer` does not scale it: `delta_yolo_class` applies it only
  together with `counters_per_class` (not supported), and the Darknet before `obj_normalizer`
  scaled objectness with it instead (yolov4.cfg and yolo-fastest set 1.0; yolov4-csp.cfg sets 0.5
  beside `obj_normalizer`, so it trained with the newer code).

Gradients are Darknet's, so that the cfg's normalisers and `[net]` learning rates carry over:
- Darknet's delta on objectness and classes is (target - output). Where the head applies the
  logistic itself, that is the gradient of BCE with logits, which we use. With `new_coords=1` the
  conv already applied it and the delta lands on the probability p: that is the gradient of
  (p - target)^2 / 2, which we use there.
- Darknet applies the IoU-loss gradient w.r.t. the decoded box (in units of the input size)
  straight to the raw x, y outputs, and times exp(raw) to the raw w, h (new_coords: straight to
  w, h), skipping the logistic, scale_x_y and grid factors. We compute the loss on the decoded box
  and route its gradient the same way (a straight-through estimator: the value is the true box,
  the gradient path is Darknet's). `max_delta` clips that box gradient per element, as an
  explicit delta that later loss scaling (AMP, accumulation) does not move (`clipped_delta_loss`).

`delta_normalizer` multiplies the whole head's gradient (box, objectness and classes), as
Darknet's GPU backward does; its CPU backward leaves it out. `max` (at most that many boxes per
image, default 200) is not applied: every box of an image counts.

Reduction: Darknet sums every delta over the batch and divides the learning rate by the batch
size. We return the sum over all heads, slots and images divided by the number of images, so SGD
with the cfg's `learning_rate` takes Darknet's step (the engine averages over accumulated
batches, which plays `subdivisions`).

The IoU-family gradient is torchvision's losses under autograd, with one of Darknet's scales:
`dx_box_iou` gives the w, h delta of the IoU part (of GIoU, for giou) twice the derivative ("we do
not divide by 2" there), so an extra term carries that second half to w and h (`iou_normalizer`
was tuned with it: without it, size regression pulled about half as hard as Darknet's). Two slips of
`dx_box_iou` are not copied: the sign of one term of the centre-distance penalty's x, y delta,
and the CIoU aspect term's missing 1/(w^2 + h^2) factor (both small at trained weights; a review
measured 0.6-1.3% of the gradient's norm on yolo-fastest-1.1); and for boxes that do not overlap,
GIoU's delta from an intersection left negative (5 of 1,920 claims on coco128). With those slips
switched off in a restatement of Darknet's deltas, the parameter gradient of this loss at the
pretrained yolo-fastest-1.1 on coco128 equals it to 1e-5 (relative), shared slots, the class gate
and `iou_thresh` 1 included; with them on, the cosine is 0.99992-0.99998.

Not supported (a warning says so when a cfg asks): `truth_thresh < 1`, `focal_loss`,
`counters_per_class`, `iou_thresh_kind` other than iou.

Reference: AlexeyAB/darknet src/yolo_layer.c; Zheng et al., "Distance-IoU Loss", AAAI 2020.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import (box_convert, box_iou, complete_box_iou_loss, distance_box_iou_loss,
                             generalized_box_iou_loss)

from detector.assign import Assignment, assign_targets
from detector.head import decode

IOU_LOSSES = ("ciou", "diou", "giou", "iou", "mse")
IGNORE_CLASS_PROBABILITY = 0.25   # Darknet ignores an overlapping prediction only if a class is above it
UNSUPPORTED_OPTIONS = {"focal_loss": 0, "counters_per_class": None}


class YoloLoss:
    """`YoloLoss(heads)(raw_outputs, targets, input_hw) -> (loss, logs)`.

    Args:
        heads: the model's `YoloHead`s in cfg order (`model.heads`).
    """

    def __init__(self, heads: Sequence):
        self.heads = list(heads)
        if not self.heads:
            raise ValueError("YoloLoss needs at least one [yolo] head, found none")
        for index, head in enumerate(self.heads):
            _check_loss_options(index, head.loss_options)

    def __call__(self, raw_outputs: Sequence[Tensor], targets: Tensor,
                 input_hw: tuple[int, int]) -> tuple[Tensor, dict[str, float]]:
        """The loss of one batch.

        Args:
            raw_outputs: train-mode model outputs, one Tensor[B, A, H, W, 5 + C] per head.
            targets: Tensor[N, 6] = (batch_index, class, cx, cy, w, h), boxes normalised to the input.
            input_hw: (height, width) of the network input in pixels.

        Returns:
            (scalar loss: sum over heads / batch size, logs: "box", "obj", "cls" (same scale),
            "positives" (box-to-slot claims), "iou" (their mean IoU with their boxes)).
        """
        if len(raw_outputs) != len(self.heads):
            raise ValueError(f"YoloLoss: expected {len(self.heads)} head outputs, found {len(raw_outputs)}")
        batch_size = raw_outputs[0].shape[0]
        targets = targets.to(device=raw_outputs[0].device, dtype=torch.float32)
        self._check_targets(targets, batch_size)
        parts: dict[str, Tensor] = {}
        positives, iou_sum = 0, 0.0
        with torch.autocast(raw_outputs[0].device.type, enabled=False):
            for head, raw in zip(self.heads, raw_outputs):
                head_parts, assigned, ious = head_loss(raw.float(), head, targets, input_hw)
                for key, value in head_parts.items():
                    parts[key] = parts[key] + value if key in parts else value
                positives += len(assigned)
                iou_sum += float(ious.sum())
        loss = (parts["box"] + parts["obj"] + parts["cls"]) / batch_size
        logs = {key: float(value.detach()) / batch_size for key, value in parts.items()}
        logs.update(positives=float(positives), iou=iou_sum / max(positives, 1))
        return loss, logs

    def _check_targets(self, targets: Tensor, batch_size: int) -> None:
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"YoloLoss: targets must be Tensor[N, 6] (batch_index, class, cx, cy, w, h), "
                             f"found shape {tuple(targets.shape)}")
        if targets.numel() == 0:
            return
        num_classes = self.heads[0].num_classes
        low, high = targets.min(dim=0).values, targets.max(dim=0).values
        if low[1] < 0 or high[1] >= num_classes:
            raise ValueError(f"YoloLoss: target classes must be in 0..{num_classes - 1}, "
                             f"found {int(low[1])}..{int(high[1])}")
        if low[0] < 0 or high[0] >= batch_size:
            raise ValueError(f"YoloLoss: target batch indices must be in 0..{batch_size - 1}, "
                             f"found {int(low[0])}..{int(high[0])}")
        if (targets[:, 4:6] <= 0).any():
            raise ValueError("YoloLoss: target widths and heights must be > 0")


def head_loss(raw: Tensor, head, targets: Tensor,
              input_hw: tuple[int, int]) -> tuple[dict[str, Tensor], Assignment, Tensor]:
    """Summed (not yet batch-normalised) box, objectness and class losses of one head, each times
    its `delta_normalizer`.

    Args:
        raw: Tensor[B, A, H, W, 5 + C], the head's raw output (float32).
        head: its `YoloHead`.
        targets: Tensor[N, 6] as in `YoloLoss.__call__`.
        input_hw: network input (height, width) in pixels.

    Returns:
        ({"box", "obj", "cls"}: scalar Tensors, the assignment (one row per claim), Tensor[P] IoU
        of each claim's prediction with its box).
    """
    options = head.loss_options
    decoded = decode(raw, head)  # [B, A, H, W, 5 + C], boxes in input pixels
    scale = raw.new_tensor([input_hw[1], input_hw[0]] * 2)
    pred_boxes = decoded[..., :4] / scale  # normalised cxcywh
    assigned = assign_targets(targets, head.all_anchors, list(head.mask), raw.shape[2:4], input_hw,
                              float(options["iou_thresh"]))
    claim = (assigned.batch, assigned.anchor, assigned.grid_y, assigned.grid_x)
    truth = targets[assigned.target]  # [P, 6]
    slots, slot_of_claim = torch.unique(assigned.flat_slots(raw.shape[1], raw.shape[2:4]), return_inverse=True)
    classes_at_slot = raw.new_zeros(len(slots), head.num_classes)  # [S, C]: 1 for each claiming box's class
    classes_at_slot[slot_of_claim, truth[:, 1].long()] = 1.0

    box_per_claim = _box_term(raw[claim][:, :4], pred_boxes[claim], truth, head, assigned, raw.shape[2:4], input_hw)
    if float(options["iou_thresh"]) < 1.0:
        box_per_claim = box_per_claim / classes_at_slot.sum(dim=1)[slot_of_claim]
    box = box_per_claim.sum()

    # Darknet's best_match_iou: the best IoU with a box of the image, for predictions with a likely class
    best_match_iou = best_box_iou(pred_boxes.detach(), targets) * _has_a_likely_class(raw.detach(), head)
    overlapping = best_match_iou > float(options["ignore_thresh"])
    if options.get("objectness_smooth"):
        obj_target = torch.where(overlapping, best_match_iou, 0.0)
        obj_weight = torch.ones_like(obj_target)
    else:
        obj_target = torch.zeros_like(raw[..., 4])
        obj_weight = (~overlapping).float()
        obj_target[claim] = 1.0
        obj_weight[claim] = 1.0
    obj = float(options["obj_normalizer"]) * (obj_weight * _probability_loss(raw[..., 4], obj_target, head)).sum()

    eps = float(options.get("label_smooth_eps", 0.0))
    cls_target = classes_at_slot * (1.0 - eps) + 0.5 * eps
    raw_classes = raw.reshape(-1, raw.shape[-1])[slots, 5:]  # [S, C]
    cls = _probability_loss(raw_classes, cls_target, head).sum()

    with torch.no_grad():
        ious = _elementwise_iou(_xyxy(pred_boxes[claim]), _xyxy(truth[:, 2:6]))
    head_scale = float(options.get("delta_normalizer", 1.0))
    parts = {"box": head_scale * box, "obj": head_scale * obj, "cls": head_scale * cls}
    return parts, assigned, ious


def _has_a_likely_class(raw: Tensor, head) -> Tensor:
    """bool Tensor[B, A, H, W]: predictions with some class probability above 0.25."""
    classes = raw[..., 5:] if head.new_coords else torch.sigmoid(raw[..., 5:])
    return classes.amax(dim=-1) > IGNORE_CLASS_PROBABILITY


def _probability_loss(raw: Tensor, target: Tensor, head) -> Tensor:
    """Elementwise loss whose gradient is Darknet's (output - target) on the head's raw values."""
    if head.new_coords:  # raw already holds probabilities (the conv applied the logistic)
        return 0.5 * (raw - target) ** 2
    return F.binary_cross_entropy_with_logits(raw, target, reduction="none")


def _box_term(raw_box: Tensor, pred_box: Tensor, truth: Tensor, head, assigned: Assignment,
              grid_hw: tuple[int, int], input_hw: tuple[int, int]) -> Tensor:
    """Per-slot box loss Tensor[P] (times `iou_normalizer`) of one head's assigned predictions.

    Args:
        raw_box: Tensor[P, 4], raw (x, y, w, h) outputs at the assigned slots.
        pred_box: Tensor[P, 4], the decoded boxes there, normalised cxcywh.
        truth: Tensor[P, 6], the target row of each slot.
    """
    options = head.loss_options
    kind = str(options["iou_loss"]).lower()
    normalizer = float(options["iou_normalizer"])

    def loss_of(raw: Tensor) -> Tensor:
        if kind == "mse":
            anchors = head.anchors.to(raw)[assigned.anchor] / raw.new_tensor(input_hw[::-1])
            cells = torch.stack([assigned.grid_x, assigned.grid_y], dim=1).to(raw)
            loss = darknet_mse_loss(raw, pred_box, truth[:, 2:6], anchors, cells, raw.new_tensor(grid_hw[::-1]),
                                    bool(head.new_coords))
        else:
            box = darknet_box_surrogate(raw, pred_box, bool(head.new_coords))
            loss = iou_kind_loss(box, truth[:, 2:6], kind) + darknet_second_half_of_size_gradient(box, truth[:, 2:6],
                                                                                                   kind)
        return normalizer * loss

    max_delta = float(options.get("max_delta", float("inf")))
    if max_delta == float("inf") or kind == "mse":      # Darknet clips the IoU losses' delta only
        return loss_of(raw_box)
    return clipped_delta_loss(raw_box, loss_of, max_delta)


def clipped_delta_loss(raw: Tensor, loss_of, bound: float) -> Tensor:
    """`loss_of(raw)` (Tensor[P], row p depending on `raw[p]` alone) whose gradient on `raw` is
    clipped elementwise to [-bound, bound], as Darknet clips each image's box delta to `max_delta`.

    The delta is computed here, on the loss itself, and carried by a linear term: whatever later
    scales the loss (the batch mean, gradient accumulation, an AMP GradScaler, DDP's average) scales
    the clipped delta, not the clip. (Clipping the incoming gradient instead would clip at
    `max_delta` x that scale: under AMP, 2^16 times too hard.)"""
    leaf = raw.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss_of(leaf)
        (delta,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    delta = torch.zeros_like(leaf) if delta is None else delta.clamp(-bound, bound)
    return value.detach() + (raw * delta).sum(dim=1) - (raw.detach() * delta).sum(dim=1)


def darknet_box_surrogate(raw_box: Tensor, pred_box: Tensor, new_coords: bool) -> Tensor:
    """The decoded box, with Darknet's gradient path back to the raw outputs.

    Args:
        raw_box: Tensor[P, 4], raw (x, y, w, h) outputs.
        pred_box: Tensor[P, 4], the decoded boxes, normalised cxcywh (only their value is used).
        new_coords: the head's `new_coords`.

    Returns:
        Tensor[P, 4] equal to `pred_box`; d(out)/d(raw) is 1 for x, y and exp(raw) (new_coords: 1)
        for w, h.
    """
    carrier_xy = raw_box[:, :2]
    carrier_wh = raw_box[:, 2:] if new_coords else raw_box[:, 2:] * raw_box[:, 2:].detach().exp()
    carrier = torch.cat([carrier_xy, carrier_wh], dim=1)
    return pred_box.detach() + carrier - carrier.detach()


def darknet_second_half_of_size_gradient(pred: Tensor, truth: Tensor, kind: str) -> Tensor:
    """Tensor[P] of zeros whose gradient on the w, h of `pred` is that of 1 - IoU (giou: 1 - GIoU;
    x, y held): added to the `kind` loss, that part's w, h gradient is twice the derivative, as in
    Darknet's `dx_box_iou` (which adds the DIoU and CIoU penalties after doubling, the GIoU term
    before). `pred`, `truth`: Tensor[P, 4], normalised cxcywh."""
    size_only = torch.cat([pred[:, :2].detach(), pred[:, 2:]], dim=1)
    part = iou_kind_loss(size_only, truth, "giou" if kind == "giou" else "iou")
    return part - part.detach()


def iou_kind_loss(pred: Tensor, truth: Tensor, kind: str) -> Tensor:
    """1 - (C/D/G)IoU per row of normalised cxcywh `pred` and `truth` (Tensor[P, 4]) -> Tensor[P]."""
    pred_xyxy, truth_xyxy = _xyxy(pred), _xyxy(truth)
    if kind == "ciou":
        return complete_box_iou_loss(pred_xyxy, truth_xyxy)
    if kind == "diou":
        return distance_box_iou_loss(pred_xyxy, truth_xyxy)
    if kind == "giou":
        return generalized_box_iou_loss(pred_xyxy, truth_xyxy)
    return 1.0 - _elementwise_iou(pred_xyxy, truth_xyxy)


def darknet_mse_loss(raw_box: Tensor, pred_box: Tensor, truth: Tensor, anchors: Tensor, cells: Tensor,
                     grid_wh: Tensor, new_coords: bool) -> Tensor:
    """Darknet's old box loss: squared error on (cell offset, log size) targets, times (2 - w*h) / 2.

    Args:
        raw_box, pred_box, truth: Tensor[P, 4] (raw outputs; normalised cxcywh; normalised cxcywh).
        anchors: Tensor[P, 2], each slot's anchor normalised to the input.
        cells: Tensor[P, 2], each slot's (grid_x, grid_y).
        grid_wh: Tensor[2], the grid's (W, H).

    Returns:
        Tensor[P]. As in Darknet the x, y error is taken on the (scaled) logistic output but its
        gradient goes straight to the raw x, y; w, h compare raw outputs with log(w / anchor)
        (new_coords: sqrt(w / (4 anchor))).
    """
    target_xy = truth[:, :2] * grid_wh - cells
    offset_xy = pred_box[:, :2].detach() * grid_wh - cells
    pred_xy = offset_xy + raw_box[:, :2] - raw_box[:, :2].detach()
    ratio = truth[:, 2:] / anchors
    target_wh = (ratio / 4).sqrt() if new_coords else ratio.log()
    error = ((pred_xy - target_xy) ** 2).sum(dim=1) + ((raw_box[:, 2:] - target_wh) ** 2).sum(dim=1)
    return 0.5 * (2.0 - truth[:, 2] * truth[:, 3]) * error


def best_box_iou(pred_boxes: Tensor, targets: Tensor) -> Tensor:
    """Each prediction's largest IoU with a box of its image (0 in an image without boxes).

    Args:
        pred_boxes: Tensor[B, A, H, W, 4], normalised cxcywh.
        targets: Tensor[N, 6] as in `YoloLoss.__call__`.

    Returns:
        Tensor[B, A, H, W].
    """
    best = pred_boxes.new_zeros(pred_boxes.shape[:-1])
    image_of_target = targets[:, 0].long()
    for image in torch.unique(image_of_target).tolist():
        truth = _xyxy(targets[image_of_target == image, 2:6])  # [T, 4]
        preds = _xyxy(pred_boxes[image].reshape(-1, 4))  # [A*H*W, 4]
        best[image] = box_iou(preds, truth).max(dim=1).values.reshape(best.shape[1:])
    return best


def _xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def _elementwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of row i of boxes1 with row i of boxes2 (xyxy Tensor[P, 4] each) -> Tensor[P]."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp(min=1e-9)


def _check_loss_options(index: int, options: dict) -> None:
    """Raise on an unknown `iou_loss`; warn on options this loss does not implement."""
    kind = str(options.get("iou_loss", "mse")).lower()
    if kind not in IOU_LOSSES:
        raise ValueError(f"[yolo] head {index}: iou_loss={kind!r} is not supported; expected one of {IOU_LOSSES}")
    ignored = [key for key, default in UNSUPPORTED_OPTIONS.items()
               if options.get(key, default) not in (default, 0, "0", None)]
    if float(options.get("truth_thresh", 1.0)) < 1.0:
        ignored.append("truth_thresh<1")
    if str(options.get("iou_thresh_kind", "iou")).lower() != "iou":
        ignored.append("iou_thresh_kind (plain IoU is used)")
    if ignored:
        warnings.warn(f"[yolo] head {index}: {', '.join(ignored)} not implemented by YoloLoss; ignored",
                      stacklevel=3)
