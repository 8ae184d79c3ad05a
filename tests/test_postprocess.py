"""Post-processing: score threshold, per-class NMS, cap, mapping to the original image (detector.postprocess)."""
from __future__ import annotations

import pytest
import torch

from data.geometry import fit_transform
from detector.postprocess import flatten_heads, postprocess, select_detections, to_original_image


def rows(*boxes):
    """Tensor[N, 5 + C] from (cx, cy, w, h, obj, cls...) tuples."""
    return torch.tensor(boxes, dtype=torch.float32)


def test_score_is_objectness_times_class_and_threshold_is_strict():
    preds = rows((50, 50, 20, 20, 0.5, 0.25, 0.75))  # scores 0.125 and 0.375
    kept = select_detections(preds, conf_thresh=0.125, iou_thresh=0.45, max_det=100)
    assert kept[:, 5].tolist() == [1.0] and kept[:, 4].tolist() == [0.375]
    both = select_detections(preds, conf_thresh=0.1249, iou_thresh=0.45, max_det=100)
    assert both[:, 5].tolist() == [1.0, 0.0]  # one box, two classes (Darknet: every class above threshold)
    torch.testing.assert_close(both[:, :4], torch.tensor([[40.0, 40.0, 60.0, 60.0]] * 2))


def test_nms_is_per_class():
    preds = rows(
        (50, 50, 20, 20, 1.0, 0.9, 0.0),
        (51, 50, 20, 20, 1.0, 0.8, 0.0),  # IoU ~0.90 with the first, same class: suppressed
        (52, 50, 20, 20, 1.0, 0.0, 0.7),  # same place, other class: kept
        (90, 90, 20, 20, 1.0, 0.6, 0.0),  # far away: kept
    )
    kept = select_detections(preds, conf_thresh=0.005, iou_thresh=0.45, max_det=100)
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept[:, 5].tolist() == [0.0, 1.0, 0.0]


def test_nms_iou_threshold_is_strict_greater():
    # two 10x10 boxes shifted by 5: intersection 50, union 150, IoU 1/3
    preds = rows((10, 10, 10, 10, 1.0, 0.9), (15, 10, 10, 10, 1.0, 0.8))
    assert len(select_detections(preds, 0.005, iou_thresh=0.34, max_det=100)) == 2
    assert len(select_detections(preds, 0.005, iou_thresh=0.33, max_det=100)) == 1


def test_max_det_keeps_highest_scores_in_order():
    preds = rows(*[(20 * i + 10, 10, 10, 10, 1.0, s) for i, s in enumerate([0.3, 0.9, 0.5, 0.7, 0.1])])
    kept = select_detections(preds, 0.005, 0.45, max_det=3)
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.5])


def test_nothing_above_threshold_gives_empty():
    kept = select_detections(rows((10, 10, 5, 5, 0.01, 0.2)), 0.005, 0.45, 100)
    assert kept.shape == (0, 6)


def greedy_reference(preds: torch.Tensor, conf: float, iou: float, max_det: int) -> list[tuple]:
    """Slow, obvious per-class greedy NMS over (box, class) candidates, as Darknet's do_nms_sort."""
    candidates = []
    for cx, cy, w, h, obj, *probs in preds.tolist():
        for cls, p in enumerate(probs):
            if obj * p > conf:
                candidates.append((obj * p, cls, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
    candidates.sort(key=lambda c: -c[0])
    kept = []
    for score, cls, box in candidates:
        if all(c != cls or box_iou(box, b) <= iou for _, c, b in kept):
            kept.append((score, cls, box))
    return kept[:max_det]


def box_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def random_head(generator: torch.Generator, batch: int, grid: int, classes: int) -> torch.Tensor:
    """Tensor[B, 3, grid, grid, 5 + C] like an eval-mode head on a 64x64 input."""
    head = torch.rand(batch, 3, grid, grid, 5 + classes, generator=generator)
    head[..., :2] *= 64
    head[..., 2:4] = head[..., 2:4] * 30 + 4
    return head


def test_matches_slow_greedy_reference_on_random_heads():
    generator = torch.Generator().manual_seed(0)
    heads = [random_head(generator, 2, 2, 3), random_head(generator, 2, 4, 3)]
    results = postprocess(heads, conf_thresh=0.3, iou_thresh=0.45, max_det=20)
    flat = flatten_heads(heads)
    assert flat.shape == (2, 3 * 4 + 3 * 16, 8)
    for preds, got in zip(flat, results):
        expected = greedy_reference(preds, 0.3, 0.45, 20)
        assert len(expected) > 5
        assert [(round(s, 5), c) for s, c, _ in expected] == [(round(s, 5), int(c)) for s, c in got[:, 4:].tolist()]
        torch.testing.assert_close(got[:, :4], torch.tensor([b for _, _, b in expected]))


def test_flatten_heads_keeps_anchor_row_column_order():
    head = torch.arange(2 * 3 * 2 * 2 * 6, dtype=torch.float32).reshape(2, 3, 2, 2, 6)
    flat = flatten_heads([head])
    assert torch.equal(flat[1, 7], head[1, 1, 1, 1])  # anchor 1, row 1, col 1 -> 1*4 + 1*2 + 1


def test_to_original_image_maps_boxes_and_keeps_scores():
    dets = torch.tensor([[100.0, 140.0, 150.0, 190.0, 0.8, 3.0]])
    mapped = to_original_image(dets, fit_transform(640, 480, 320, 320, letterbox=True))
    torch.testing.assert_close(mapped, torch.tensor([[200.0, 200.0, 300.0, 300.0, 0.8, 3.0]]))
