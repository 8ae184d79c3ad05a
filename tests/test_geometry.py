"""Resize / letterbox to the network input and the inverse box mapping (data.geometry, data.eval_dataset)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.eval_dataset import to_network_input
from data.geometry import boxes_to_network, boxes_to_original, fit_transform


@pytest.mark.parametrize("orig, net, expected", [
    # (orig_w, orig_h), (net_w, net_h), (new_w, new_h, pad_x, pad_y): Darknet's integer arithmetic
    ((640, 480), (320, 320), (320, 240, 0, 40)),
    ((480, 640), (320, 320), (240, 320, 40, 0)),
    ((640, 427), (416, 416), (416, 277, 0, 69)),      # 427*416//640 = 277, (416-277)//2 = 69
    ((500, 333), (608, 320), (480, 320, 64, 0)),      # height limits: 500*320//333 = 480
    ((320, 320), (320, 320), (320, 320, 0, 0)),
])
def test_letterbox_transform_matches_darknet_arithmetic(orig, net, expected):
    t = fit_transform(*orig, *net, letterbox=True)
    assert (t.new_w, t.new_h, t.pad_x, t.pad_y) == expected


def test_plain_resize_stretches_to_network():
    t = fit_transform(640, 480, 320, 256, letterbox=False)
    assert (t.new_w, t.new_h, t.pad_x, t.pad_y) == (320, 256, 0, 0)
    assert not t.letterboxed


@pytest.mark.parametrize("letterbox", [False, True])
def test_boxes_round_trip_through_network_coordinates(letterbox):
    t = fit_transform(640, 427, 416, 320, letterbox)
    boxes = torch.tensor([[0.0, 0.0, 640.0, 427.0], [10.5, 20.25, 300.0, 200.0], [600.0, 400.0, 639.0, 426.0]])
    back = boxes_to_original(boxes_to_network(boxes, t), t)
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-4)


def test_boxes_to_original_undoes_letterbox_offset_and_scale():
    t = fit_transform(640, 480, 320, 320, letterbox=True)  # scale 0.5, pad_y 40
    net_boxes = torch.tensor([[0.0, 40.0, 320.0, 280.0], [100.0, 140.0, 150.0, 190.0]])
    expected = torch.tensor([[0.0, 0.0, 640.0, 480.0], [200.0, 200.0, 300.0, 300.0]])
    torch.testing.assert_close(boxes_to_original(net_boxes, t), expected)


def test_boxes_to_original_clips_to_the_image():
    t = fit_transform(640, 480, 320, 320, letterbox=True)
    outside = torch.tensor([[-20.0, 0.0, 340.0, 320.0]])  # reaches into the padding and beyond
    torch.testing.assert_close(boxes_to_original(outside, t), torch.tensor([[0.0, 0.0, 640.0, 480.0]]))


def test_letterboxed_input_has_grey_border_and_image_content():
    image = np.zeros((480, 640, 3), np.uint8)
    image[..., 0] = 255  # pure red (RGB)
    tensor, t = to_network_input(image, 320, 320, letterbox=True)
    assert tensor.shape == (3, 320, 320) and tensor.dtype == torch.float32
    assert torch.all(tensor[:, :40] == 0.5) and torch.all(tensor[:, 280:] == 0.5)
    content = tensor[:, 40:280]
    assert torch.all(content[0] == 1.0) and torch.all(content[1:] == 0.0)


def test_plain_resize_keeps_a_feature_where_the_mapping_says():
    image = np.zeros((300, 600, 3), np.uint8)
    image[100:200, 300:400] = 255  # a white square, x 300..400, y 100..200
    tensor, t = to_network_input(image, 320, 320, letterbox=False)
    ys, xs = torch.nonzero(tensor[1] > 0.5, as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    torch.testing.assert_close(boxes_to_original(found, t), torch.tensor([[300.0, 100.0, 400.0, 200.0]]),
                               rtol=0, atol=2.0)


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="positive"):
        fit_transform(0, 480, 320, 320, letterbox=True)
