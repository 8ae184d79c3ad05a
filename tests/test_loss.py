"""YOLO loss and target assignment (detector.assign, detector.loss) on a tiny two-head model."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou, complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from detector import decode, load_darknet
from detector.assign import anchor_shape_iou, assign_targets
from detector.loss import YoloLoss

INPUT = 64
CLASSES = 3
# Anchors in input pixels; head 0 (stride 32, 2x2 grid) predicts with 2 and 3, head 1 (stride 16,
# 4x4 grid) with 0 and 1.
ANCHORS = "10,10, 20,20, 40,40, 60,60"


def tiny_cfg(yolo_extra: str = "", new_coords: bool = False) -> str:
    activation = "logistic" if new_coords else "linear"
    yolo = (f"anchors={ANCHORS}\nclasses={CLASSES}\nnum=4\nignore_thresh=.7\niou_thresh=0.213\n"
            f"iou_normalizer=0.07\niou_loss=ciou\nscale_x_y=1.1\n"
            f"{'new_coords=1' if new_coords else ''}\n{yolo_extra}\n")
    conv = "[convolutional]\nbatch_normalize=1\nfilters={f}\nsize=3\nstride=2\npad=1\nactivation=leaky\n\n"
    head_filters = 2 * (5 + CLASSES)
    return (f"[net]\nbatch=4\nsubdivisions=1\nwidth={INPUT}\nheight={INPUT}\nchannels=3\n\n"
            + conv.format(f=8) + conv.format(f=8) + conv.format(f=16) + conv.format(f=16) + conv.format(f=16)
            + f"[convolutional]\nfilters={head_filters}\nsize=1\nstride=1\npad=1\nactivation={activation}\n\n"
            + f"[yolo]\nmask=2,3\n{yolo}\n[route]\nlayers=-4\n\n"
            + f"[convolutional]\nfilters={head_filters}\nsize=1\nstride=1\npad=1\nactivation={activation}\n\n"
            + f"[yolo]\nmask=0,1\n{yolo}")


@pytest.fixture
def make_model(tmp_path):
    def make(yolo_extra: str = "", new_coords: bool = False):
        path = tmp_path / f"tiny-{abs(hash((yolo_extra, new_coords)))}.cfg"
        path.write_text(tiny_cfg(yolo_extra, new_coords))
        torch.manual_seed(0)
        return load_darknet(path).train()
    return make


def targets_of(rows) -> torch.Tensor:
    """Tensor[N, 6] from (batch, class, cx, cy, w_px, h_px) rows; sizes given in input pixels."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    t[:, 4:6] /= INPUT
    return t


# ----------------------------------------------------------------------------- assignment
def test_anchor_shape_iou_hand_values():
    ious = anchor_shape_iou(torch.tensor([[30.0, 30.0], [10.0, 40.0]]),
                            torch.tensor([[20.0, 20.0], [40.0, 40.0], [10.0, 10.0]]))
    expected = torch.tensor([[400 / 900, 900 / 1600, 100 / 900],
                             [200 / (400 + 400 - 200), 400 / 1600, 100 / 400]])
    torch.testing.assert_close(ious, expected)


def test_best_anchor_over_all_heads_and_extra_anchor_above_iou_thresh():
    anchors = torch.tensor([[10.0, 10], [20, 20], [40, 40], [60, 60]])
    # 30x30 box: IoUs with the anchors 0.111, 0.444, 0.5625, 0.25 -> best is anchor 2 (mask 2,3 head);
    # anchor 1 (0.444 > 0.213) is assigned too in the other head, anchor 3 (0.25 > 0.213) in this one.
    targets = targets_of([(0, 1, 0.3, 0.6, 30, 30)])
    coarse = assign_targets(targets, anchors, [2, 3], (2, 2), (INPUT, INPUT), iou_thresh=0.213)
    fine = assign_targets(targets, anchors, [0, 1], (4, 4), (INPUT, INPUT), iou_thresh=0.213)
    assert coarse.anchor.tolist() == [0, 1] and coarse.grid_x.tolist() == [0, 0] and coarse.grid_y.tolist() == [1, 1]
    assert fine.anchor.tolist() == [1] and fine.grid_x.tolist() == [1] and fine.grid_y.tolist() == [2]
    # iou_thresh 0.3 keeps only anchor 1's 0.444 in the fine head and nothing extra in the coarse one.
    coarse = assign_targets(targets, anchors, [2, 3], (2, 2), (INPUT, INPUT), iou_thresh=0.3)
    assert coarse.anchor.tolist() == [0]
    # iou_thresh >= 1 (Darknet's default) turns extra anchors off: the fine head gets nothing.
    fine = assign_targets(targets, anchors, [0, 1], (4, 4), (INPUT, INPUT), iou_thresh=1.0)
    assert len(fine) == 0


def test_every_claim_of_a_slot_is_kept_and_edges_clamp():
    anchors = torch.tensor([[10.0, 10], [20, 20]])
    targets = targets_of([(1, 0, 0.55, 0.55, 9, 9), (1, 2, 0.6, 0.6, 11, 11), (0, 1, 1.0, 0.0, 20, 20)])
    got = assign_targets(targets, anchors, [0, 1], (4, 4), (INPUT, INPUT), iou_thresh=1.0)
    rows = sorted(zip(got.batch.tolist(), got.anchor.tolist(), got.grid_y.tolist(), got.grid_x.tolist(),
                      got.target.tolist()))
    assert rows == [(0, 1, 0, 3, 2), (1, 0, 2, 2, 0), (1, 0, 2, 2, 1)]   # both boxes claim (1, 0, 2, 2)
    assert got.flat_slots(2, (4, 4)).tolist() == [((1 * 2 + 0) * 4 + 2) * 4 + 2] * 2 + [(1 * 4 + 0) * 4 + 3]


# ----------------------------------------------------------------------------- loss
def perfect_raw(model, targets: torch.Tensor, batch: int, big: float = 30.0) -> list[torch.Tensor]:
    """Raw outputs whose decoding is exactly each target at its assigned slots, objectness and class
    certain there, and no objectness elsewhere."""
    raws = []
    for head in model.heads:
        grid = INPUT // int(head.stride)
        new_coords = head.new_coords
        raw = torch.zeros(batch, len(head.mask), grid, grid, 5 + CLASSES)
        raw[..., 4:] = 0.0 if new_coords else -big
        a = assign_targets(targets, head.all_anchors, head.mask, (grid, grid), (INPUT, INPUT),
                           head.loss_options["iou_thresh"])
        truth = targets[a.target]
        s = head.scale_x_y
        frac = torch.stack([truth[:, 2] * grid - a.grid_x, truth[:, 3] * grid - a.grid_y], dim=1)
        activated = (frac + (s - 1) / 2) / s
        ratio = truth[:, 4:6] * INPUT / head.anchors[a.anchor]
        slot = (a.batch, a.anchor, a.grid_y, a.grid_x)
        if new_coords:
            raw[slot + (slice(0, 2),)] = activated
            raw[slot + (slice(2, 4),)] = ratio.sqrt() / 2
        else:
            raw[slot + (slice(0, 2),)] = torch.log(activated / (1 - activated))
            raw[slot + (slice(2, 4),)] = ratio.log()
        raw[slot + (4,)] = 1.0 if new_coords else big
        one_hot = torch.nn.functional.one_hot(truth[:, 1].long(), CLASSES).float()
        raw[slot + (slice(5, None),)] = one_hot if new_coords else (2 * one_hot - 1) * big
        raws.append(raw.requires_grad_())
    return raws


TARGETS = [(0, 1, 0.30, 0.60, 30, 30), (0, 2, 0.70, 0.20, 12, 16), (1, 0, 0.45, 0.55, 50, 40)]


@pytest.mark.parametrize("new_coords", [False, True])
def test_loss_is_at_its_minimum_on_perfect_predictions(make_model, new_coords):
    model = make_model(new_coords=new_coords)
    targets = targets_of(TARGETS)
    raws = perfect_raw(model, targets, batch=2)
    for head, raw in zip(model.heads, raws):  # the construction really decodes to the boxes
        decoded = decode(raw.detach(), head)
        assert torch.isfinite(decoded).all()
    loss, logs = YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))
    assert logs["positives"] >= len(TARGETS)
    assert logs["iou"] == pytest.approx(1.0, abs=1e-5)
    assert loss.item() < 1e-5
    loss.backward()
    for raw in raws:  # objectness and classes are smooth and flat here (box IoU has a kink at 1)
        assert raw.grad[..., 4:].abs().max() < 1e-4
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):  # any small move raises the loss
        moved = [r.detach() + 0.05 * torch.randn(r.shape, generator=generator) for r in raws]
        worse, _ = YoloLoss(model.heads)(moved, targets, (INPUT, INPUT))
        assert worse.item() > loss.item() + 1e-4


@pytest.mark.parametrize("kind", ["giou", "diou", "iou", "mse"])
@pytest.mark.parametrize("new_coords", [False, True])
def test_every_iou_loss_kind_is_zero_on_the_box_and_grows_off_it(make_model, kind, new_coords):
    model = make_model(new_coords=new_coords)
    for head in model.heads:
        head.loss_options["iou_loss"] = kind
    targets = targets_of(TARGETS)
    raws = perfect_raw(model, targets, batch=2)
    assert YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[1]["box"] < 1e-5
    for channel in range(4):
        moved = [r.detach().clone() for r in raws]
        moved[0][..., channel] += 0.2
        assert YoloLoss(model.heads)(moved, targets, (INPUT, INPUT))[1]["box"] > 1e-4


def test_gradients_are_finite_and_reach_every_head(make_model):
    model = make_model()
    images = torch.rand(2, 3, INPUT, INPUT)
    targets = targets_of(TARGETS)
    loss, logs = YoloLoss(model.heads)(model(images), targets, (INPUT, INPUT))
    loss.backward()
    assert math.isfinite(loss.item()) and set(logs) >= {"box", "obj", "cls", "positives", "iou"}
    head_convs = [model.layers[5], model.layers[8]]  # the conv feeding each [yolo]
    for conv in head_convs:
        grads = [p.grad for p in conv.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_images_without_boxes_give_objectness_only_loss(make_model):
    model = make_model()
    loss, logs = YoloLoss(model.heads)(model(torch.rand(2, 3, INPUT, INPUT)), torch.zeros(0, 6), (INPUT, INPUT))
    loss.backward()
    assert logs["box"] == 0 and logs["cls"] == 0 and logs["obj"] > 0 and logs["positives"] == 0
    assert model.layers[5].conv.weight.grad.abs().sum() > 0


def test_ignore_thresh_leaves_out_good_unassigned_predictions(make_model):
    """A prediction that overlaps the box (IoU 0.28) but is not assigned is no negative when the
    IoU exceeds ignore_thresh: its objectness BCE (log 2 at logit 0) leaves the loss."""
    model = make_model()
    targets = targets_of([(0, 1, 0.30, 0.60, 30, 30)])
    raws = perfect_raw(model, targets, batch=1)
    with torch.no_grad():  # coarse head, anchor 0, cell (y=1, x=1): not assigned (the box is in x=0)
        raws[0][0, 0, 1, 1, :4] = raws[0][0, 0, 1, 0, :4]
        raws[0][0, 0, 1, 1, 0] -= 2.0
        raws[0][0, 0, 1, 1, 4] = 0.0
        raws[0][0, 0, 1, 1, 7] = 2.0     # class 2 at 0.88 (the box's is 1): Darknet ignores only predictions
                                         # with some class > 0.25, whichever
    box = decode(raws[0].detach(), model.heads[0])[0, 0, 1, 1, :4]
    truth = torch.tensor([0.30 * INPUT, 0.60 * INPUT, 30, 30])
    overlap = (30 - (box[0] - truth[0])) * 30
    iou = overlap / (2 * 900 - overlap)
    assert 0.2 < iou < 0.5
    obj = {}
    for thresh in (0.2, 0.5):
        for head in model.heads:
            head.loss_options["ignore_thresh"] = thresh
        obj[thresh] = YoloLoss(model.heads)([r.detach() for r in raws], targets, (INPUT, INPUT))[1]["obj"]
    assert obj[0.5] - obj[0.2] == pytest.approx(math.log(2), abs=1e-4)
    for head in model.heads:
        head.loss_options["ignore_thresh"] = 0.2
    with torch.no_grad():
        raws[0][0, 0, 1, 1, 7] = -1.2    # 0.23: no likely class, so it stays a negative at any threshold
    unlikely = YoloLoss(model.heads)([r.detach() for r in raws], targets, (INPUT, INPUT))[1]["obj"]
    assert unlikely == pytest.approx(obj[0.5], abs=1e-6)


@pytest.mark.parametrize("kind, loss_of, doubled", [
    ("ciou", complete_box_iou_loss, "iou"), ("diou", distance_box_iou_loss, "iou"),
    ("giou", generalized_box_iou_loss, "giou")])
def test_box_gradient_takes_darknets_path(make_model, kind, loss_of, doubled):
    """d loss / d raw = iou_normalizer * d(1 - CIoU)/d(box in input units) * (1 for x, y; exp(raw) for w, h) / B,
    plus once more the w, h derivative of 1 - IoU (of 1 - GIoU for giou; Darknet's dx_box_iou does not
    halve it)."""
    model = make_model()
    for each in model.heads:
        each.loss_options["iou_loss"] = kind
    head = model.heads[0]
    targets = targets_of([(0, 1, 0.30, 0.60, 30, 30)])
    raws = [torch.zeros(1, 2, 2, 2, 5 + CLASSES), torch.zeros(1, 2, 4, 4, 5 + CLASSES)]
    raws[0][0, 0, 1, 0, :4] = torch.tensor([0.3, -0.2, 0.25, -0.1])
    raws = [r.requires_grad_() for r in raws]
    YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0].backward()

    box = (decode(raws[0].detach(), head)[0, 0, 1, 0, :4] / INPUT).requires_grad_()
    truth = targets[0, 2:6]
    xyxy = lambda b: torch.cat([b[:2] - b[2:] / 2, b[:2] + b[2:] / 2])[None]  # noqa: E731
    loss_of(xyxy(box), xyxy(truth)).sum().backward()
    size = box.detach().clone().requires_grad_()
    part = 1 - box_iou(xyxy(size), xyxy(truth)) if doubled == "iou" else generalized_box_iou_loss(xyxy(size), xyxy(truth))
    part.sum().backward()
    derivative = box.grad + torch.cat([torch.zeros(2), size.grad[2:]])
    expected = 0.07 * derivative * torch.tensor([1, 1, math.exp(0.25), math.exp(-0.1)])
    torch.testing.assert_close(raws[0].grad[0, 0, 1, 0, :4], expected, rtol=1e-4, atol=1e-7)
    assert (size.grad[2:].abs() > 0.1 * box.grad[2:].abs()).all()     # the extra half is not negligible here


def slot_gradient(model, rows) -> torch.Tensor:
    """The gradient on the fine head's raw output at slot (image 0, anchor 0, cell y=2, x=2) of the
    loss of boxes `rows` (batch, class, cx, cy, w_px, h_px), all on that slot; raw outputs 0.2."""
    raws = [torch.full((1, 2, 2, 2, 5 + CLASSES), 0.2), torch.full((1, 2, 4, 4, 5 + CLASSES), 0.2)]
    raws = [r.requires_grad_() for r in raws]
    YoloLoss(model.heads)(raws, targets_of(rows), (INPUT, INPUT))[0].backward()
    return raws[1].grad[0, 0, 2, 2]


def test_boxes_sharing_a_slot_add_their_box_terms_over_their_classes_and_make_a_multi_hot_target(make_model):
    """As Darknet: every box's delta adds to the slot's (`delta_yolo_box` accumulates), divided by the
    number of classes among them (`averages_yolo_deltas`); the class target keeps each box's class.
    Before, the last box took the slot: the first one's box and class were lost."""
    model = make_model()
    first, second = (0, 0, 0.58, 0.58, 10, 12), (0, 2, 0.60, 0.62, 11, 9)    # both: anchor 0, cell (2, 2)
    alone = [slot_gradient(model, [row]) for row in (first, second)]
    both = slot_gradient(model, [first, second])
    torch.testing.assert_close(both[:4], (alone[0][:4] + alone[1][:4]) / 2)  # two classes: the mean
    torch.testing.assert_close(both[4], alone[0][4])                          # objectness: one target 1
    probability = torch.sigmoid(torch.tensor(0.2))
    torch.testing.assert_close(both[5:], torch.stack([probability - 1, probability, probability - 1]))
    same_class = (0, 0, 0.60, 0.62, 11, 9)
    together = slot_gradient(model, [first, same_class])
    torch.testing.assert_close(together[:4], alone[0][:4] + slot_gradient(model, [same_class])[:4])  # one class: the sum
    for head in model.heads:           # Darknet averages only where iou_thresh < 1 (yolov3, yolov4-tiny: 1)
        head.loss_options["iou_thresh"] = 1.0
    alone = [slot_gradient(model, [row]) for row in (first, second)]
    torch.testing.assert_close(slot_gradient(model, [first, second])[:4], alone[0][:4] + alone[1][:4])


def test_mse_box_gradient_is_darknets_delta(make_model):
    """Darknet's mse delta: scale * (t - out) for x, y (out: the scaled logistic, applied to raw)
    and scale * (log(w / anchor) - raw) for w, h, with scale = (2 - w*h) * iou_normalizer."""
    model = make_model()
    head = model.heads[0]
    head.loss_options["iou_loss"] = "mse"
    targets = targets_of([(0, 1, 0.30, 0.60, 30, 30)])
    raws = [torch.zeros(1, 2, 2, 2, 5 + CLASSES), torch.zeros(1, 2, 4, 4, 5 + CLASSES)]
    raws[0][0, 0, 1, 0, :4] = torch.tensor([0.3, -0.2, 0.25, -0.1])
    raws = [r.requires_grad_() for r in raws]
    YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0].backward()
    s = head.scale_x_y
    out_xy = s * torch.sigmoid(torch.tensor([0.3, -0.2])) - (s - 1) / 2
    target_xy = torch.tensor([0.30 * 2 - 0, 0.60 * 2 - 1])  # cell (x=0, y=1) of the 2x2 grid
    target_wh = torch.log(torch.tensor([30.0, 30.0]) / head.anchors[0])
    scale = 0.07 * (2 - (30 / INPUT) ** 2)
    expected = scale * torch.cat([out_xy - target_xy, torch.tensor([0.25, -0.1]) - target_wh])
    torch.testing.assert_close(raws[0].grad[0, 0, 1, 0, :4], expected)


def test_max_delta_clips_box_gradient(make_model):
    targets = targets_of([(0, 1, 0.30, 0.60, 30, 30)])
    grads = {}
    for extra in ("", "max_delta=0.001"):
        model = make_model(yolo_extra=extra)
        raws = [torch.zeros(1, 2, 2, 2, 5 + CLASSES), torch.zeros(1, 2, 4, 4, 5 + CLASSES)]
        raws[0][0, 0, 1, 0, 2:4] = 2.0  # far too large a box: big w, h gradients
        raws = [r.requires_grad_() for r in raws]
        YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0].backward()
        grads[extra] = raws[0].grad[0, 0, 1, 0, :4]
    assert grads[""].abs().max() > 0.001
    torch.testing.assert_close(grads["max_delta=0.001"], grads[""].clamp(-0.001, 0.001))


def test_options_the_loss_does_not_implement_are_named(make_model):
    with pytest.warns(UserWarning) as warned:
        YoloLoss(make_model(yolo_extra="objectness_smooth=1\nfocal_loss=1\ntruth_thresh=0.9").heads)
    assert [str(w.message) for w in warned] == [
        f"[yolo] head {index}: focal_loss, truth_thresh<1 not implemented by YoloLoss; ignored" for index in (0, 1)]


def test_objectness_smooth_trains_every_prediction_towards_its_best_iou_or_0_as_darknet_does(make_model):
    """With `objectness_smooth`, Darknet's objectness delta is (best_match_iou - output) where that
    IoU exceeds ignore_thresh and (0 - output) elsewhere, claimed slots included (a claim replaces
    the delta only where it is exactly 0). BCE with logits: the logit's gradient is output - target."""
    model = make_model(yolo_extra="objectness_smooth=1")
    targets = targets_of([(0, 1, 0.30, 0.60, 30, 30)])          # claimed: coarse head, anchor 0, cell (1, 0)
    raws = perfect_raw(model, targets, batch=1)
    with torch.no_grad():
        raws[0][0, 0, 1, 1, :4] = raws[0][0, 0, 1, 0, :4]         # unclaimed, overlapping the box
        raws[0][0, 0, 1, 1, 0] -= 2.0
        raws[0][0, 0, 1, 1, 4] = 0.0
        raws[0][0, 0, 1, 1, 7] = 2.0                               # a likely class
        raws[0][0, 1, 1, 0, 2:4] = -2.0                            # claimed (anchor 3 > iou_thresh): an 8 px box
        raws[0][0, 1, 1, 0, 4] = 0.5
    decoded = decode(raws[0].detach(), model.heads[0])[0, :, 1, :, :4]       # [A, W, 4] in input pixels
    truth = torch.tensor([[0.30 * INPUT - 15, 0.60 * INPUT - 15, 0.30 * INPUT + 15, 0.60 * INPUT + 15]])
    iou = box_iou(torch.cat([decoded[..., :2] - decoded[..., 2:] / 2, decoded[..., :2] + decoded[..., 2:] / 2],
                            -1).reshape(-1, 4), truth).reshape(2, 2)  # [anchor, x]
    for head in model.heads:
        head.loss_options["ignore_thresh"] = 0.2
    assert iou[0, 1] > 0.2 and iou[1, 0] < 0.2 and iou[0, 0] > 0.999
    raws = [r.detach().requires_grad_() for r in raws]
    YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0].backward()
    obj_grad = raws[0].grad[0, :, 1, :, 4]
    assert obj_grad[0, 1] == pytest.approx(0.5 - float(iou[0, 1]), abs=1e-5)            # towards its IoU
    assert obj_grad[1, 0] == pytest.approx(float(torch.sigmoid(torch.tensor(0.5))), abs=1e-5)  # claimed: towards 0
    assert abs(float(obj_grad[0, 0])) < 1e-5                                            # claimed, IoU 1: towards 1
    plain = make_model()
    raws_plain = [r.detach().requires_grad_() for r in raws]
    for head in plain.heads:
        head.loss_options["ignore_thresh"] = 0.2
    YoloLoss(plain.heads)(raws_plain, targets, (INPUT, INPUT))[0].backward()
    assert raws_plain[0].grad[0, 0, 1, 1, 4] == 0                                       # ignored without it
    assert raws_plain[0].grad[0, 1, 1, 0, 4] == pytest.approx(float(torch.sigmoid(torch.tensor(0.5))) - 1, abs=1e-5)


def test_max_delta_leaves_the_mse_box_loss_alone_as_darknet_does(tmp_path):
    """Found by a review: Darknet's delta_yolo_box clips to max_delta in its IoU branch only."""
    targets = targets_of([(0, 1, 0.30, 0.60, 30, 30)])
    grads = {}
    for extra in ("", "max_delta=0.001"):
        path = tmp_path / f"mse{len(extra)}.cfg"
        path.write_text(tiny_cfg(extra).replace("iou_loss=ciou", "iou_loss=mse"))
        model = load_darknet(path).train()
        raws = [torch.zeros(1, 2, 2, 2, 5 + CLASSES), torch.zeros(1, 2, 4, 4, 5 + CLASSES)]
        raws[0][0, 0, 1, 0, 2:4] = 2.0
        raws = [r.requires_grad_() for r in raws]
        YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0].backward()
        grads[extra] = raws[0].grad[0, 0, 1, 0, :4]
    assert grads[""].abs().max() > 0.001
    torch.testing.assert_close(grads["max_delta=0.001"], grads[""])


def test_max_delta_clips_each_images_delta_whatever_scales_the_loss_later(make_model):
    """Found by a review: the clip acted on the incoming gradient, so an AMP GradScaler's 2^16 (or
    gradient accumulation) moved it; under AMP yolov4's max_delta=5 all but froze box regression."""
    targets = targets_of([(0, 1, 0.30, 0.60, 30, 30)])

    def box_grad(extra: str, scale: float) -> torch.Tensor:
        model = make_model(yolo_extra=extra)
        raws = [torch.zeros(2, 2, 2, 2, 5 + CLASSES), torch.zeros(2, 2, 4, 4, 5 + CLASSES)]   # 2 images
        raws[0][0, 0, 1, 0, 2:4] = 2.0
        raws = [r.requires_grad_() for r in raws]
        (scale * YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0]).backward()
        return raws[0].grad[0, 0, 1, 0, :4] / scale

    image_delta = 2 * box_grad("", 1.0)                      # the loss is the batch mean
    assert image_delta.abs().max() > 0.001
    for scale in (1.0, 2.0 ** 16):
        torch.testing.assert_close(box_grad("max_delta=0.001", scale), image_delta.clamp(-0.001, 0.001) / 2)


def test_cls_normalizer_leaves_the_class_gradient_alone(make_model):
    """Darknet's delta_yolo_class applies cls_normalizer only with counters_per_class; yolov4-csp.cfg
    sets 0.5, which before scaled our class term by half."""
    targets = targets_of(TARGETS)
    images = torch.rand(2, 3, INPUT, INPUT)
    grads = {}
    for extra in ("", "cls_normalizer=0.5"):
        model = make_model(yolo_extra=extra)
        assert model.heads[0].loss_options["cls_normalizer"] == (0.5 if extra else 1.0)
        raws = [r.detach().requires_grad_() for r in model(images)]
        YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0].backward()
        grads[extra] = [r.grad for r in raws]
    for plain, other in zip(grads[""], grads["cls_normalizer=0.5"]):
        assert plain[..., 5:].abs().sum() > 0
        torch.testing.assert_close(other, plain)


def test_delta_normalizer_scales_the_heads_whole_gradient(make_model):
    """Darknet's GPU backward multiplies each [yolo] layer's delta by its delta_normalizer."""
    targets = targets_of(TARGETS)
    images = torch.rand(2, 3, INPUT, INPUT)
    raws = {}
    for extra in ("", "delta_normalizer=0.25"):
        model = make_model(yolo_extra=extra)
        raws[extra] = [r.detach().requires_grad_() for r in model(images)]
        YoloLoss(model.heads)(raws[extra], targets, (INPUT, INPUT))[0].backward()
    for plain, scaled in zip(raws[""], raws["delta_normalizer=0.25"]):
        assert plain.grad.abs().sum() > 0
        torch.testing.assert_close(scaled.grad, 0.25 * plain.grad)


def test_label_smoothing_moves_the_class_optimum(make_model):
    eps = 0.1
    model = make_model(yolo_extra=f"label_smooth_eps={eps}")
    targets = targets_of([(0, 2, 0.30, 0.60, 30, 30)])
    raws = perfect_raw(model, targets, batch=1)
    target_pos = 1 - eps + eps / 2
    with torch.no_grad():  # the smoothed targets' logits: zero class gradient there
        for raw in raws:
            positive = raw[..., 4] > 0
            logits = raw[..., 5:][positive]
            raw[..., 5:][positive] = torch.where(logits > 0, math.log(target_pos / (1 - target_pos)),
                                                 math.log((eps / 2) / (1 - eps / 2)))
    YoloLoss(model.heads)(raws, targets, (INPUT, INPUT))[0].backward()
    assert all(r.grad[..., 5:].abs().max() < 1e-5 for r in raws)


def test_bad_targets_and_options_raise(make_model):
    model = make_model()
    raws = [torch.zeros(1, 2, 2, 2, 5 + CLASSES), torch.zeros(1, 2, 4, 4, 5 + CLASSES)]
    with pytest.raises(ValueError, match="classes must be in 0..2"):
        YoloLoss(model.heads)(raws, targets_of([(0, 3, 0.5, 0.5, 10, 10)]), (INPUT, INPUT))
    with pytest.raises(ValueError, match="batch indices"):
        YoloLoss(model.heads)(raws, targets_of([(1, 0, 0.5, 0.5, 10, 10)]), (INPUT, INPUT))
    model.heads[0].loss_options["iou_loss"] = "siou"
    with pytest.raises(ValueError, match="iou_loss='siou'"):
        YoloLoss(model.heads)
