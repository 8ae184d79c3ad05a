"""From decoded YOLO head outputs to final detections: score threshold, per-class NMS, cap.

Darknet semantics (`get_yolo_detections` + `do_nms_sort`): every (box, class) pair whose score
objectness x class probability is above the threshold is a candidate, so one box may give detections
of several classes; NMS runs per class; boxes overlap when IoU > the NMS threshold.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import batched_nms, box_convert

from data.geometry import FitTransform, boxes_to_original


def flatten_heads(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join the heads' eval-mode outputs, each Tensor[B, A, Hk, Wk, 5 + C], into Tensor[B, N, 5 + C]."""
    return torch.cat([out.reshape(out.shape[0], -1, out.shape[-1]) for out in outputs], dim=1)


def select_detections(predictions: torch.Tensor, conf_thresh: float, iou_thresh: float,
                      max_det: int) -> torch.Tensor:
    """Detections of one image.

    Args:
        predictions: Tensor[N, 5 + C], rows (cx, cy, w, h, objectness, class probabilities...) as the
            eval-mode model gives them (boxes in network-input pixels).
        conf_thresh: keep (box, class) pairs with objectness x class probability > conf_thresh.
        iou_thresh: per-class NMS drops a box whose IoU with a higher-scored one is > iou_thresh.
        max_det: keep at most this many detections, the highest-scored.

    Returns:
        Tensor[M, 6]: (x1, y1, x2, y2, score, class) in network-input pixels, by decreasing score.
    """
    scores = predictions[:, 5:] * predictions[:, 4:5]               # [N, C]
    box_index, classes = (scores > conf_thresh).nonzero(as_tuple=True)
    if box_index.numel() == 0:
        return predictions.new_zeros((0, 6))
    boxes = box_convert(predictions[box_index, :4], "cxcywh", "xyxy")  # [K, 4]
    candidate_scores = scores[box_index, classes]
    keep = batched_nms(boxes, candidate_scores, classes, iou_thresh)[:max_det]
    return torch.cat([boxes[keep], candidate_scores[keep, None], classes[keep, None].to(boxes.dtype)], dim=1)


def postprocess(outputs: Sequence[torch.Tensor], conf_thresh: float, iou_thresh: float,
                max_det: int) -> list[torch.Tensor]:
    """`select_detections` for each image of a batch of eval-mode outputs (see `flatten_heads`).

    Returns:
        list of B Tensor[M_b, 6] (x1, y1, x2, y2, score, class), network-input pixels.
    """
    return [select_detections(p, conf_thresh, iou_thresh, max_det) for p in flatten_heads(outputs)]


def to_original_image(detections: torch.Tensor, transform: FitTransform) -> torch.Tensor:
    """Map Tensor[M, 6] detections from network-input to original-image pixels (clipped)."""
    mapped = detections.clone()
    mapped[:, :4] = boxes_to_original(detections[:, :4], transform)
    return mapped
