"""Training data: record cleaning, corrupt images, augmentation/box consistency, collate (data.augment,
data.train_dataset)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.augment import AugmentConfig, build_plain_transform, scale_hsv
from data.geometry import boxes_to_network, fit_transform
from data.sources import DetectionRecord, DetectionSource
from data.seeded_batches import SeededBatchSampler
from data.train_dataset import DetectionTrainDataset, clean_records, collate_detection, multi_scale_sizes

NO_COLOUR = {"hue": 0.0, "saturation": 1.0, "exposure": 1.0}


def write_rectangles(path, size_wh, boxes) -> None:
    """A black image with a white filled rectangle per xyxy box (pixel-exact edges)."""
    image = np.zeros((size_wh[1], size_wh[0], 3), np.uint8)
    for x1, y1, x2, y2 in boxes:
        image[int(y1):int(y2), int(x1):int(x2)] = 255
    cv2.imwrite(str(path), image)


def record(path, size_wh, boxes, classes=None, crowd=None, image_id=1) -> DetectionRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.zeros(len(boxes), np.int64) if classes is None else np.asarray(classes, np.int64)
    crowd = np.zeros(len(boxes), bool) if crowd is None else np.asarray(crowd, bool)
    return DetectionRecord(image_id, path, size_wh[0], size_wh[1], boxes, classes, crowd)


def rectangles_source(tmp_path, specs) -> DetectionSource:
    """specs: list of ((w, h), boxes) -> a source of generated rectangle images, 2 classes."""
    records = []
    for index, (size_wh, boxes) in enumerate(specs):
        path = tmp_path / f"{index:03d}.png"
        write_rectangles(path, size_wh, boxes)
        records.append(record(path, size_wh, boxes, classes=[i % 2 for i in range(len(boxes))], image_id=index + 1))
    return DetectionSource(records, ["a", "b"], [1, 2])


def test_clean_records_drops_crowd_clips_and_drops_degenerate_with_one_warning(tmp_path):
    path = tmp_path / "a.png"
    write_rectangles(path, (100, 80), [])
    rec = record(path, (100, 80),
                 [[10, 10, 50, 50], [-5, 20, 30, 90], [40, 40, 40.5, 60], [200, 10, 250, 20],
                  [5, 5, 20, 20], [np.nan, 0, 10, 10]],
                 classes=[0, 1, 0, 1, 1, 0], crowd=[0, 0, 0, 0, 1, 0])
    with pytest.warns(UserWarning) as caught:
        cleaned = clean_records([rec, record(tmp_path / "missing.png", (10, 10), [])])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert any("1 missing" in m and "missing.png" in m for m in messages)
    label_warning = next(m for m in messages if "clipped" in m)
    assert "1 box(es) clipped" in label_warning and "2 box(es) without area" in label_warning
    assert "a.png" in label_warning
    (only,) = cleaned                     # the 0.5 px wide box stays: the size limit is the output's
    np.testing.assert_array_equal(only.boxes, [[10, 10, 50, 50], [0, 20, 30, 80], [40, 40, 40.5, 60]])
    np.testing.assert_array_equal(only.classes, [0, 1, 0])
    assert not only.iscrowd.any()


def test_clean_records_is_silent_on_clean_data(tmp_path):
    source = rectangles_source(tmp_path, [((64, 64), [[8, 8, 40, 40]]), ((64, 64), [])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(clean_records(source.records)) == 2


def test_corrupt_image_is_skipped_and_named(tmp_path):
    source = rectangles_source(tmp_path, [((64, 64), [[8, 8, 40, 40]]), ((64, 64), [[0, 0, 32, 32]])])
    source.records[0].path.write_bytes(b"not an image")
    dataset = DetectionTrainDataset(source, AugmentConfig(64), augment=False)
    with pytest.warns(UserWarning, match="000.png"):
        image, labels = dataset[0]
    # it served the next image instead: its one box at (0, 0, 32, 32) -> centre 0.25, size 0.5
    torch.testing.assert_close(labels, torch.tensor([[0.0, 0.25, 0.25, 0.5, 0.5]]))
    with warnings.catch_warnings():  # reported once
        warnings.simplefilter("error")
        dataset[0]


def test_collate_format_and_images_without_boxes(tmp_path):
    source = rectangles_source(tmp_path, [((64, 32), [[0, 0, 32, 16], [32, 16, 64, 32]]), ((64, 64), []),
                                          ((32, 64), [[8, 8, 24, 40]])])
    dataset = DetectionTrainDataset(source, AugmentConfig(64), augment=False)
    images, targets = collate_detection([dataset[i] for i in range(3)])
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() == 1.0
    expected = torch.tensor([[0, 0, 0.25, 0.25, 0.5, 0.5], [0, 1, 0.75, 0.75, 0.5, 0.5],
                             [2, 0, 0.5, 0.375, 0.5, 0.5]])
    torch.testing.assert_close(targets, expected)


def test_plain_letterbox_matches_geometry(tmp_path):
    boxes = np.array([[10, 20, 60, 45]], np.float32)
    image = np.zeros((50, 100, 3), np.uint8)
    out = build_plain_transform(64, letterbox=True)(image=image, bboxes=boxes, class_labels=[0])
    expected = boxes_to_network(torch.from_numpy(boxes), fit_transform(100, 50, 64, 64, letterbox=True))
    assert out["image"].shape == (64, 64, 3)
    np.testing.assert_allclose(np.asarray(out["bboxes"]), expected.numpy(), atol=1.0)


def white_inside(image: np.ndarray, box: np.ndarray) -> float:
    """Fraction of white pixels in an xyxy box shrunk by 1 px (edges blur under interpolation)."""
    x1, y1, x2, y2 = np.round(box).astype(int) + np.array([1, 1, -1, -1])
    patch = image[y1:y2, x1:x2].mean(axis=2)
    return float((patch > 200).mean()) if patch.size else 1.0


@pytest.mark.parametrize("mosaic", [0.0, 1.0])
def test_augmented_boxes_follow_the_pixels(tmp_path, mosaic):
    """Every box lies on a white rectangle, and no white area thicker than 2 px (slivers under the
    size limit are dropped) is left without a box."""
    specs = [((96, 64), [[10, 8, 40, 30], [55, 30, 90, 60]]), ((64, 96), [[20, 40, 50, 90]]),
             ((80, 80), [[5, 5, 35, 75], [45, 20, 75, 35]]), ((64, 64), [[16, 16, 48, 48]])]
    config = AugmentConfig(64, jitter=0.3, resize=1.4, flip=0.5, mosaic=mosaic, **NO_COLOUR)
    dataset = DetectionTrainDataset(rectangles_source(tmp_path, specs), config)
    torch.manual_seed(0)
    boxes_seen = 0
    for _ in range(6):
        for index in range(len(dataset)):
            image_t, labels = dataset[index]
            image = image_t.permute(1, 2, 0).numpy()
            xyxy = torch.cat([labels[:, 1:3] - labels[:, 3:5] / 2, labels[:, 1:3] + labels[:, 3:5] / 2], 1) * 64
            covered = np.zeros(image.shape[:2], np.uint8)
            for box in xyxy.numpy():
                assert white_inside(image, box) > 0.95
                x1, y1, x2, y2 = np.round(box).astype(int)
                covered[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = 1
            white = (image.mean(axis=2) > 200).astype(np.uint8)  # the padding is grey (128)
            solid_white = cv2.erode(white, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
            assert not (solid_white & (1 - covered)).any()
            boxes_seen += len(labels)
    assert boxes_seen > 20


def test_same_seed_same_sample_and_colour_jitter_changes_pixels(tmp_path):
    source = rectangles_source(tmp_path, [((64, 64), [[8, 8, 40, 40]])])
    dataset = DetectionTrainDataset(source, AugmentConfig(64, hue=0.5, saturation=2.0, exposure=2.0, mosaic=1.0))
    torch.manual_seed(3)
    first = dataset[0]
    torch.manual_seed(3)
    again = dataset[0]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    plain = DetectionTrainDataset(source, AugmentConfig(64), augment=False)[0][0]
    assert not torch.equal(first[0], plain)


def test_brightness_is_drawn_as_darknets_as_often_darker_as_brighter(tmp_path):
    """Found by a review: albumentations' ColorJitter drew the brightness factor uniformly in
    [1/1.5, 1.5]: 39% of images darker, 1.08x brighter on average. Darknet's `rand_scale` draws
    in [1, 1.5] and inverts half of its draws."""
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((64, 64, 3), 100, np.uint8))
    source = DetectionSource([record(tmp_path / "grey.png", (64, 64), [])], ["a", "b"], [1, 2])
    dataset = DetectionTrainDataset(source, AugmentConfig(64, jitter=0.0, flip=0.0, hue=0.0, saturation=1.0,
                                                          exposure=1.5))
    factors = np.array([float(dataset[(0, seed, None)][0].float().mean()) / 100 for seed in range(1000)])
    assert factors.min() > 1 / 1.5 - 0.01 and factors.max() < 1.5 + 0.01
    assert 0.45 < np.mean(factors < 1) < 0.55
    assert abs(np.mean(np.log(factors))) < 0.025


def test_colour_is_scaled_in_hsv_as_darknet_does():
    """Saturation scales HSV's S, so a pixel keeps its brightest channel (ColorJitter's blend with
    grey turned (200, 150, 100) into (220, 146, 70), Darknet's 8-bit HSV gives (200, 125, 51)); grey
    has no saturation to scale; the hue turns round the circle."""
    pixel = np.array([[[200, 150, 100]]], np.uint8)
    assert scale_hsv(pixel, 0.0, 1.5, 1.0).tolist() == [[[200, 125, 51]]]
    assert scale_hsv(np.full((1, 1, 3), 90, np.uint8), 0.0, 1.5, 1.0).tolist() == [[[90, 90, 90]]]
    assert scale_hsv(pixel, 0.0, 1.0, 1.5).tolist() == [[[255, 192, 128]]]      # value x1.5, clipped at 255
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert scale_hsv(red, -0.25, 1.0, 1.0).tolist() == [[[128, 0, 255]]]        # 0 - 90 degrees: violet
    assert scale_hsv(red, 0.5, 1.0, 1.0).tolist() == [[[0, 255, 255]]]          # half the circle: cyan
    photo = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    assert scale_hsv(photo, 0.0, 1.0, 1.0) is photo                              # found by a review: no round trip
    grey = np.full((2, 2), 100, np.uint8)
    assert scale_hsv(grey, 0.3, 1.5, 0.5).tolist() == [[50, 50], [50, 50]]      # one channel: the value alone


def test_flip_shift_and_brightness_are_drawn_independently(tmp_path):
    """Found by a review: every transform took the same seed, so each drew the same first random
    number: a flipped image was always shifted one way and darker, an unflipped one the other way
    and brighter. Two grey boxes side by side (class 0 left of class 1) over 200 seeds: flipped
    samples (class 0 now on the right) shift both ways and are as often bright as dark."""
    image = np.zeros((64, 64, 3), np.uint8)
    boxes = [[16, 26, 28, 38], [36, 26, 48, 38]]                 # centred pair: mean x-centre 32
    for x1, y1, x2, y2 in boxes:
        image[y1:y2, x1:x2] = 100                                # below 255 / 1.5: brightness never clips
    cv2.imwrite(str(tmp_path / "pair.png"), image)
    source = DetectionSource([record(tmp_path / "pair.png", (64, 64), boxes, classes=[0, 1])], ["a", "b"], [1, 2])
    config = AugmentConfig(64, jitter=0.2, flip=0.5, hue=0.0, saturation=1.0, exposure=1.5)
    dataset = DetectionTrainDataset(source, config)
    shifts, brightness, flipped = [], [], []
    for seed in range(200):
        out, labels = dataset[(0, seed, None)]
        assert labels[:, 0].tolist() == [0.0, 1.0]
        centres = labels[:, 1] * 64
        shifts.append(float(centres.mean()) - 32)
        flipped.append(bool(centres[0] > centres[1]))
        brightness.append(float(out.float().max()))            # the boxes' grey times the brightness factor
    shifts, brightness, flipped = np.array(shifts), np.array(brightness), np.array(flipped)
    assert 0.3 < flipped.mean() < 0.7
    assert (shifts[flipped] < -2).mean() > 0.2 and (shifts[flipped] > 2).mean() > 0.2
    bright = brightness > np.median(brightness)
    assert abs(np.corrcoef(flipped, bright)[0, 1]) < 0.3


def zooms_of_a_centred_box(tmp_path, config: AugmentConfig, seeds: int = 300) -> np.ndarray:
    """(x zoom, y zoom) per seed: a 10 px box at the centre of a 100 x 100 image, its augmented
    size over its size without augmentation (the crop never reaches it: jitter < 0.45)."""
    source = rectangles_source(tmp_path, [((100, 100), [[45, 45, 55, 55]])])
    plain = DetectionTrainDataset(source, AugmentConfig(64), augment=False)[0][1][0, 3:5]
    dataset = DetectionTrainDataset(source, config)
    return np.array([(dataset[(0, seed, None)][1][0, 3:5] / plain).tolist() for seed in range(seeds)])


def test_jitter_crops_or_pads_each_side_apart_as_darknet_does(tmp_path):
    """Found by a review: `[yolo] jitter` was parsed and unused, and a fixed zoom of 0.75-1.25 ran
    instead. Darknet crops or pads each side by its own fraction in [-jitter, jitter], so jitter .3
    (yolov4) zooms by 1 / (1 + 0.6) .. 1 / (1 - 0.6) = 0.62-2.5 per axis, x and y apart."""
    zooms = zooms_of_a_centred_box(tmp_path, AugmentConfig(64, jitter=0.3, flip=0.0, **NO_COLOUR))
    assert zooms.min() >= 0.6 and zooms.max() <= 2.6
    assert (zooms < 0.7).mean() > 0.01 and (zooms > 1.8).mean() > 0.01       # both tails, in x and in y
    assert abs(np.corrcoef(zooms[:, 0], zooms[:, 1])[0, 1]) < 0.2           # the aspect ratio changes
    assert np.median(zooms) == pytest.approx(1.0, abs=0.1)
    still = zooms_of_a_centred_box(tmp_path, AugmentConfig(64, jitter=0.0, flip=0.0, **NO_COLOUR), seeds=5)
    np.testing.assert_allclose(still, 1.0, atol=1e-6)


def test_resize_zooms_x_and_y_alike_and_shifts_as_darknet_does(tmp_path):
    """Darknet's resize moves the left and top sides by one draw in [-(r - 1) / 2, (1 - 1 / r) / 2]
    of the side, the right and bottom sides by another: a zoom of both axes alike within [1/r, r]
    that zooms in for about a third of the draws at r = 1.5, and shifts the image (found by a
    review: an Affine zoom about the centre ran, which zoomed in for 60% and hardly moved a box)."""
    zooms = zooms_of_a_centred_box(tmp_path, AugmentConfig(64, jitter=0.0, resize=1.5, flip=0.0, **NO_COLOUR))
    np.testing.assert_allclose(zooms[:, 0], zooms[:, 1], atol=0.03)
    assert zooms.min() >= 1 / 1.5 - 0.02 and zooms.max() <= 1.5 + 0.02
    assert zooms.min() < 0.75 and zooms.max() > 1.35
    assert 0.2 < (zooms[:, 0] > 1.01).mean() < 0.45
    source = rectangles_source(tmp_path, [((100, 100), [[45, 45, 55, 55]])])
    dataset = DetectionTrainDataset(source, AugmentConfig(64, jitter=0.0, resize=1.5, flip=0.0, **NO_COLOUR))
    centres = np.array([float(dataset[(0, seed, None)][1][0, 1]) * 64 for seed in range(300)])
    assert np.percentile(centres, 95) - np.percentile(centres, 5) > 8                      # px at 64
    out = zooms_of_a_centred_box(tmp_path, AugmentConfig(64, jitter=0.0, resize=0.5, flip=0.0, **NO_COLOUR))
    assert out.min() < 0.6 and out.max() <= 1.0 + 0.02                    # below 1: zoom out only


def test_letterbox_training_keeps_the_aspect_and_jitter_still_changes_it(tmp_path):
    """Darknet's letter_box widens or heightens the crop to the network's aspect before its stretch,
    so jitter's aspect change survives (found by a review: a letterbox fit after the crop undid it).
    Without jitter the result is the plain letterbox, within a pixel."""
    source = rectangles_source(tmp_path, [((120, 60), [[50, 20, 70, 40]])])       # a square box
    plain = DetectionTrainDataset(source, AugmentConfig(64, letterbox=True), augment=False)[0][1][0, 1:] * 64
    still = DetectionTrainDataset(source, AugmentConfig(64, letterbox=True, jitter=0.0, flip=0.0, **NO_COLOUR))
    for seed in range(5):
        torch.testing.assert_close(still[(0, seed, None)][1][0, 1:] * 64, plain, atol=1.0, rtol=0)
    dataset = DetectionTrainDataset(source, AugmentConfig(64, letterbox=True, jitter=0.3, flip=0.0, **NO_COLOUR))
    aspects = np.array([float(labels[0, 3] / labels[0, 4]) for labels in
                        (dataset[(0, seed, None)][1] for seed in range(200))])
    assert aspects.min() < 0.75 and aspects.max() > 1.33


def test_a_small_box_of_an_image_the_stretch_enlarges_is_kept(tmp_path):
    """Found by a review: the 2 px limit ran after every step, so at the source image's scale: a
    1.5 px wide box of a 100 px image, 6 px wide at 416, was always dropped; and a second review:
    a box under 1 px of the source image, 3.3 px at 416, went before any augmentation."""
    source = rectangles_source(tmp_path, [((100, 100), [[40, 40, 41.5, 60], [10, 10, 30, 30], [60, 40, 60.8, 60]])])
    for augment in (True, False):
        dataset = DetectionTrainDataset(source, AugmentConfig(416, jitter=0.1, flip=0.0, **NO_COLOUR), augment)
        for seed in range(10):
            labels = dataset[(0, seed, None)][1]
            assert len(labels) == 3 and float(labels[:, 3].min()) * 416 > 2


def test_a_multi_scale_side_is_augmented_at_that_side_not_enlarged(tmp_path):
    """As Darknet loads images at its new size: a 96 px checkerboard fitted to 96 stays exact, where
    fitting it to 64 and enlarging that to 96 blurred it."""
    board = ((np.indices((96, 96)).sum(axis=0) % 2) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "board.png"), np.dstack([board] * 3))
    source = DetectionSource([record(tmp_path / "board.png", (96, 96), [[8, 8, 40, 40]])], ["a", "b"], [1, 2])
    image = DetectionTrainDataset(source, AugmentConfig(64), augment=False)[(0, 0, 96)][0]
    assert torch.equal(image[0], torch.from_numpy(board))
    for mosaic in (0.0, 1.0):                                   # augmented, alone or in a mosaic
        augmented = DetectionTrainDataset(source, AugmentConfig(64, mosaic=mosaic))
        assert [augmented[(0, seed, side)][0].shape[-1] for seed, side in enumerate((32, 96, None))] == [32, 96, 64]


def test_a_box_of_exactly_the_size_limit_stays():
    from data.train_dataset import _at_least, _labels

    for side in range(32, 640, 32):
        labels = _labels(np.array([[3.3, 5, 5.3, 9], [3.3, 5, 5.2, 9]], np.float32), np.array([0, 1]), (side, side))
        assert _at_least(labels, 2.0, side)[:, 0].tolist() == [0.0], side


def test_the_darknet_crop_is_rebuilt_from_its_albumentations_dict():
    import albumentations as A

    from data.augment import DarknetCrop

    rebuilt = A.from_dict(A.to_dict(DarknetCrop(0.3, 1.5, letterbox=True)))
    assert (rebuilt.jitter, rebuilt.resize, rebuilt.letterbox, rebuilt.percent) == (0.3, 1.5, True, (-0.3, 0.3))


def test_the_darknet_crop_pads_with_the_images_mean_colour():
    """As Darknet's `cv::mean` fill (it padded with grey before)."""
    import albumentations as A

    from data.augment import DarknetCrop

    crop = A.Compose([DarknetCrop(0.3)])
    image = np.full((40, 60, 3), (200, 50, 10), np.uint8)
    image[:10, :10] = 0                                      # mean (191.7, 47.9, 9.6)
    padded = 0
    for seed in range(8):
        crop.set_random_seed(seed)
        colours = {tuple(c) for c in np.unique(crop(image=image)["image"].reshape(-1, 3), axis=0)}
        assert colours <= {(0, 0, 0), (200, 50, 10), (192, 48, 10)}
        padded += (192, 48, 10) in colours
    assert padded >= 4
    grey = image[..., 0]                                     # a one-channel image pads with its mean too
    crop.set_random_seed(0)
    assert set(np.unique(crop(image=grey)["image"])) <= {0, 192, 200}


def test_the_mosaic_seams_fall_where_darknets_do(tmp_path):
    """Darknet cuts its mosaic at x and y drawn in [0.2, 0.8] of the side (albumentations' default
    was [0.3, 0.7]). Sixteen images of distinct flat greys: the seam is the first column (row) where
    the mosaic's top row (left column) changes colour."""
    records = []
    for index in range(16):
        path = tmp_path / f"{index:02d}.png"
        cv2.imwrite(str(path), np.full((64, 64, 3), 10 + 15 * index, np.uint8))
        records.append(record(path, (64, 64), [], image_id=index + 1))
    dataset = DetectionTrainDataset(DetectionSource(records, ["a", "b"], [1, 2]),
                                    AugmentConfig(64, mosaic=1.0, jitter=0.0, flip=0.0, **NO_COLOUR))
    seams = []
    for seed in range(150):
        image = dataset[(seed % 16, seed, None)][0][0].float()
        for line in (image[0], image[:, 0]):
            changes = torch.nonzero((line - line[0]).abs() > 4)
            if len(changes):
                seams.append(int(changes[0]) / 64)
    seams = np.array(seams)
    assert len(seams) > 200
    assert seams.min() >= 0.18 and seams.max() <= 0.82
    assert (seams < 0.215).mean() > 0.01 and (seams > 0.785).mean() > 0.01


def test_each_image_of_a_mosaic_is_augmented_on_its_own(tmp_path):
    """As Darknet: a mosaic's four images each get their own brightness (and flip and jitter), where
    one augmentation of the whole mosaic would light its four corners alike. Four flat greys of 100."""
    records = []
    for index in range(4):
        path = tmp_path / f"{index}.png"
        cv2.imwrite(str(path), np.full((64, 64, 3), 100, np.uint8))
        records.append(record(path, (64, 64), [], image_id=index + 1))
    config = AugmentConfig(64, mosaic=1.0, jitter=0.0, flip=0.0, hue=0.0, saturation=1.0, exposure=2.0)
    dataset = DetectionTrainDataset(DetectionSource(records, ["a", "b"], [1, 2]), config)
    differ = []
    for seed in range(40):
        image = dataset[(seed % 4, seed, None)][0].float()
        corners = torch.stack([image[:, 0, 0], image[:, 0, -1], image[:, -1, 0], image[:, -1, -1]])
        differ.append(float(corners.max() - corners.min()) > 4)
    assert np.mean(differ) > 0.8


def test_mosaic_partners_are_read_only_for_samples_that_use_them(tmp_path, monkeypatch):
    import data.train_dataset as train_dataset

    source = rectangles_source(tmp_path, [((64, 64), [[8, 8, 40, 40]]), ((64, 64), [[4, 4, 20, 30]])])
    dataset = DetectionTrainDataset(source, AugmentConfig(64, mosaic=0.5))
    reads = []
    real_read = train_dataset.read_annotated_image
    monkeypatch.setattr(train_dataset, "read_annotated_image",
                        lambda path, *args: reads.append(path) or real_read(path, *args))
    torch.manual_seed(0)
    samples = 60
    for index in range(samples):
        dataset[index % 2]
    partner_reads = len(reads) - samples
    assert partner_reads % 3 == 0  # one image per sample, plus 3 partners for each mosaic
    assert 0.3 * samples <= partner_reads / 3 <= 0.7 * samples  # mosaic probability 0.5


def test_multi_scale_batches_share_one_drawn_side(tmp_path):
    assert multi_scale_sizes(320) == [256, 288, 320, 352, 384, 416, 448]              # 320 / 1.4 .. 320 * 1.4
    assert multi_scale_sizes(320, 1.2) == [288, 320, 352, 384]
    source = rectangles_source(tmp_path, [((64, 64), [[8, 8, 40, 40]]), ((64, 64), [])])
    dataset = DetectionTrainDataset(source, AugmentConfig(64), augment=False)
    torch.manual_seed(0)
    sides = set()
    for batch in SeededBatchSampler(torch.utils.data.SequentialSampler(range(12)), 2, sides=[32, 96]):
        assert len({side for _, _, side in batch}) == 1                      # one side per batch
        images, targets = collate_detection([dataset[(index % 2, seed, side)] for index, seed, side in batch])
        sides.add(images.shape[-1])
        assert images.shape[-2:] == (batch[0][2], batch[0][2])
        torch.testing.assert_close(targets, collate_detection([dataset[0], dataset[1]])[1])   # normalised
    assert sides == {32, 96}


def test_a_box_that_multi_scale_shrinks_below_the_size_limit_is_dropped(tmp_path):
    """Found by a review: the 2 px limit was applied at the network size, before the batch's side
    shrank the image (a 2.03 px box at 608 came out 1.54 px at 448)."""
    source = rectangles_source(tmp_path, [((64, 64), [[8, 8, 11, 40], [20, 20, 50, 50]])])   # 3 px wide
    dataset = DetectionTrainDataset(source, AugmentConfig(64, jitter=0.0, flip=0.0, min_box_size=2.0, **NO_COLOUR))
    assert len(dataset[(0, 0, 64)][1]) == 2
    assert len(dataset[(0, 0, 96)][1]) == 2
    small = dataset[(0, 0, 32)][1]                             # 1.5 px at side 32
    assert len(small) == 1 and small[0, 3] * 32 == pytest.approx(15, abs=0.5)
    plain = DetectionTrainDataset(source, AugmentConfig(64), augment=False)
    assert len(plain[(0, 0, 32)][1]) == 2                      # without augmentation the limit is 1 px
    assert len(plain[(0, 0, 16)][1]) == 1


def test_augmentation_does_not_depend_on_the_loaders_workers(tmp_path):
    """Found by a kill-and-resume fuzz: each worker process drew augmentation from its own
    generator, so a run resumed with another --workers trained on other samples."""
    source = rectangles_source(tmp_path, [((64, 48), [[8, 8, 40, 40]]), ((48, 64), [[4, 10, 30, 50]]),
                                          ((64, 64), [[20, 20, 60, 50]]), ((40, 64), [])] * 2)
    dataset = DetectionTrainDataset(source, AugmentConfig(64, mosaic=0.5, jitter=0.3, resize=1.5))

    def epoch(workers: int) -> list:
        torch.manual_seed(3)
        batches = SeededBatchSampler(torch.utils.data.RandomSampler(dataset), 3, sides=[32, 64])
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             collate_fn=collate_detection)
        seen = []
        for images, targets in loader:      # workers fetch ahead; the step draws, as dropout on the CPU does
            seen.append((images, targets, torch.rand(())))
        return seen

    single, pooled = epoch(0), epoch(2)
    assert [len(images) for images, _, _ in single] == [3, 3, 2]
    for (images, targets, step_draw), (images2, targets2, step_draw2) in zip(single, pooled, strict=True):
        assert torch.equal(images, images2) and torch.equal(targets, targets2) and step_draw == step_draw2


def test_ddp_ranks_draw_other_seeds_and_rank_0_those_of_one_process():
    def seeds(stream: int) -> list[int]:
        torch.manual_seed(5)
        batches = SeededBatchSampler(torch.utils.data.SequentialSampler(range(6)), 2, stream=stream)
        return [seed for batch in batches for _, seed, _ in batch]

    torch.manual_seed(5)
    drawn = [int(torch.randint(0, 2**31 - 1, ())) for _ in range(6)]     # what one process drew before
    assert seeds(0) == drawn and seeds(1) != drawn


def test_seeded_batch_sampler_counts_and_passes_the_epoch_on():
    class EpochSampler(torch.utils.data.SequentialSampler):
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    order = EpochSampler(range(7))
    assert len(SeededBatchSampler(order, 3)) == 3 and len(SeededBatchSampler(order, 3, drop_last=True)) == 2
    assert [len(batch) for batch in SeededBatchSampler(order, 3, drop_last=True)] == [3, 3]
    SeededBatchSampler(order, 3).set_epoch(5)
    assert order.epoch == 5
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SeededBatchSampler(order, 0)


def test_augment_config_from_net_and_validation():
    class Net:  # the [net] fields AugmentConfig reads
        width, letter_box, hue, saturation, exposure, flip, mosaic = 320, True, 0.1, 1.5, 1.4, False, True
    config = AugmentConfig.from_net(Net(), jitter=0.05)
    assert (config.size, config.letterbox, config.hue, config.saturation, config.exposure) == (320, True, 0.1, 1.5, 1.4)
    assert config.flip == 0.0 and config.mosaic == 0.5 and config.jitter == 0.05
    with pytest.raises(ValueError, match="multiple of 32"):
        AugmentConfig(100)
    with pytest.raises(ValueError, match=r"AugmentConfig: jitter=0.5 with resize=1 can crop an image away"):
        AugmentConfig(64, jitter=0.5)
    with pytest.raises(ValueError, match=r"hue must be in \[0, 0.5\], found 0.6; resize=0: expected a zoom factor > 0"):
        AugmentConfig(64, hue=0.6, resize=0)
    with pytest.raises(ValueError, match=r"jitter=-0.1: expected a fraction >= 0"):
        AugmentConfig(64, jitter=-0.1)
    with pytest.raises(ValueError, match="unknown settings"):
        AugmentConfig.from_net(Net(), colour=1)


def test_importing_data_opens_no_url():
    """albumentations asks PyPI for updates at import unless told not to; nothing may go online."""
    probe = ("import urllib.request\n"
             "opened = []\n"
             "def refuse(self, url, *args, **kwargs):\n"
             "    opened.append(str(getattr(url, 'full_url', url)))\n"
             "    raise OSError('no network in this test')\n"
             "urllib.request.OpenerDirector.open = refuse\n"
             "import data\n"
             "print(opened)\n")
    env = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout


def test_multi_scale_collate_still_works_and_says_it_is_deprecated(tmp_path):
    from data import MultiScaleCollate

    source = rectangles_source(tmp_path, [((64, 64), [[8, 8, 40, 40]])])
    dataset = DetectionTrainDataset(source, AugmentConfig(64), augment=False)
    with pytest.warns(DeprecationWarning, match="SeededBatchSampler"):
        collate = MultiScaleCollate([32])
    images, targets = collate([dataset[0]])
    assert images.shape == (1, 3, 32, 32) and torch.equal(targets, collate_detection([dataset[0]])[1])
