"""Darknet `.weights` read/write: layout, header versions, strict size checks, round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import detector
from detector import WeightsHeader
from detector.cfg import DarknetError

# Layer 0: conv 3->4, 3x3, batch norm. Layer 1: conv 4->6, 1x1, bias. Layer 2: yolo (1 class).
CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=6
size=1
activation=linear

[yolo]
mask=0
anchors=8,8
classes=1
num=1
"""
LAYER0 = 4 + 4 + 4 + 4 + 4 * 3 * 3 * 3       # beta, gamma, mean, var, weights: 124 floats
LAYER1 = 6 + 6 * 4                            # bias, weights: 30 floats
HEADER64 = 20


@pytest.fixture
def small(tmp_path):
    """(cfg path, weights path) of the small cfg, the weights written by hand: values 0, 1, 2..."""
    cfg = tmp_path / "small.cfg"
    cfg.write_text(CFG)
    weights = tmp_path / "small.weights"
    header = np.array([0, 2, 5], "<i4").tobytes() + np.array([77], "<u8").tobytes()
    weights.write_bytes(header + np.arange(LAYER0 + LAYER1, dtype="<f4").tobytes())
    return cfg, weights


def test_reader_puts_each_value_where_darknet_does(small):
    cfg, weights = small
    model = detector.load_darknet(cfg, weights)
    first, second = model.layers[0], model.layers[1]
    values = torch.arange(LAYER0 + LAYER1, dtype=torch.float32)
    assert torch.equal(first.bn.bias, values[0:4])                 # bias = batch-norm beta
    assert torch.equal(first.bn.weight, values[4:8])               # scales = gamma
    assert torch.equal(first.bn.running_mean, values[8:12])
    assert torch.equal(first.bn.running_var, values[12:16])
    assert torch.equal(first.conv.weight, values[16:LAYER0].view(4, 3, 3, 3))
    assert first.conv.bias is None
    assert torch.equal(second.conv.bias, values[LAYER0:LAYER0 + 6])
    assert torch.equal(second.conv.weight, values[LAYER0 + 6:].view(6, 4, 1, 1))
    assert model.weights_header == WeightsHeader(0, 2, 5, seen=77)


def test_write_then_read_is_bit_identical(small, tmp_path):
    cfg, weights = small
    model = detector.load_darknet(cfg, weights)
    copy = tmp_path / "copy.weights"
    detector.write_weights(copy, model, model.weights_header)
    assert copy.read_bytes() == weights.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.weights", "small.cfg",
                                                          "small.weights"]   # no temp left


def test_real_weights_round_trip_bit_identical(shared_data, tmp_path):
    cfg = shared_data("darknet", "yolo-fastest-1.1.cfg")
    weights = shared_data("darknet", "yolo-fastest-1.1.weights")
    model = detector.load_darknet(cfg, weights)
    copy = tmp_path / "copy.weights"
    detector.write_weights(copy, model, model.weights_header)
    assert copy.read_bytes() == weights.read_bytes()


@pytest.mark.parametrize("header, seen_bytes", [
    (WeightsHeader(0, 1, 0, seen=123), 4),         # 0*10 + 1 < 2: 32-bit seen (old Darknet)
    (WeightsHeader(0, 2, 5, seen=2**40 + 3), 8),    # current Darknet: 64-bit
    (WeightsHeader(1, 0, 0, seen=9), 8),
    (WeightsHeader(1000, 2, 0, seen=5), 8),         # as AlexeyAB and OpenCV read it (a review: pjreddie's 4 bytes
                                                    # put every weight 4 bytes out of step for them)
])
def test_seen_is_int32_or_int64_by_version(small, tmp_path, header, seen_bytes):
    cfg, weights = small
    model = detector.load_darknet(cfg, weights)
    path = tmp_path / "v.weights"
    detector.write_weights(path, model, header)
    data = path.read_bytes()
    assert len(data) == 12 + seen_bytes + 4 * (LAYER0 + LAYER1)
    assert np.frombuffer(data[:12], "<i4").tolist() == [header.major, header.minor,
                                                        header.revision]
    assert int(np.frombuffer(data[12:12 + seen_bytes], f"<u{seen_bytes}")[0]) == header.seen
    other = detector.load_darknet(cfg, path)
    assert other.weights_header == header
    assert torch.equal(other.layers[1].conv.weight, model.layers[1].conv.weight)


def test_truncated_file_names_the_layer_that_ran_out(small, tmp_path):
    cfg, weights = small
    cut = tmp_path / "cut.weights"
    cut.write_bytes(weights.read_bytes()[:HEADER64 + 4 * (LAYER0 + 10)])
    with pytest.raises(DarknetError) as info:
        detector.load_darknet(cfg, cut)
    message = str(info.value)
    assert message.startswith(f"{cut}: file ends inside layer 1 ({cfg}:14 [convolutional])")
    assert f"needs bytes {HEADER64 + 4 * LAYER0}..{HEADER64 + 4 * (LAYER0 + LAYER1)}" in message
    assert f"the file has {HEADER64 + 4 * (LAYER0 + 10)} bytes" in message
    assert f"needs {HEADER64 + 4 * (LAYER0 + LAYER1)} bytes in total" in message
    cut.write_bytes(weights.read_bytes()[:10])
    with pytest.raises(DarknetError, match="header: expected at least 16 bytes, found 10"):
        detector.load_darknet(cfg, cut)
    cut.write_bytes(weights.read_bytes()[:18])
    with pytest.raises(DarknetError, match="version 0.2.5 needs 20 header bytes, found 18"):
        detector.load_darknet(cfg, cut)


def test_nan_or_infinity_in_a_layer_is_refused_naming_it_and_nothing_is_loaded(small, tmp_path):
    """Found by a review: a NaN in a .weights file loaded silently; predict found nothing and eval
    scored 0 without a word."""
    cfg, weights = small
    values = np.arange(LAYER0 + LAYER1, dtype="<f4")
    for bad in (np.nan, np.inf):
        values[LAYER0 + 3] = bad                    # in layer 1's bias
        broken = tmp_path / "broken.weights"
        broken.write_bytes(weights.read_bytes()[:HEADER64] + values.tobytes())
        model = detector.load_darknet(cfg)
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        with pytest.raises(DarknetError, match=rf"broken.weights: bytes {HEADER64 + 4 * LAYER0}\.\."
                                               rf"{HEADER64 + 4 * (LAYER0 + LAYER1)} \(layer 1 \(.*small.cfg:14 "
                                               rf"\[convolutional\]\)\) hold 1 NaN or infinite value\(s\)"):
            detector.read_weights(broken, model)
        assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_file_of_the_first_layers_loads_only_where_asked_as_darknet_partial_writes_them(small, tmp_path):
    """`darknet partial` writes the first layers of a model (yolov4.conv.137), to train a model of
    other classes from: `partial=True` loads them, with a warning, and leaves the rest as they are."""
    cfg, weights = small
    full = detector.load_darknet(cfg, weights)
    first = tmp_path / "first.weights"
    first.write_bytes(weights.read_bytes()[:HEADER64 + 4 * LAYER0])
    with pytest.raises(DarknetError, match=rf"{first}: file ends where layer 1 \({cfg}:14 \[convolutional\]\) "
                                           r"starts: .*\(a partial file, as `darknet partial` writes\? detect train"):
        detector.load_darknet(cfg, first)
    torch.manual_seed(3)
    fresh = detector.load_darknet(cfg)
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match=r"first.weights: weights for the first 1 of 2 convolutional layers "
                                         r"\(up to layer 0 .*the other 1 keep their initialisation"):
        started = detector.load_darknet(cfg, first, partial=True)
    assert torch.equal(started.layers[0].conv.weight, full.layers[0].conv.weight)
    assert torch.equal(started.layers[1].conv.weight, fresh.layers[1].conv.weight)
    first.write_bytes(weights.read_bytes()[:HEADER64 + 4 * LAYER0 + 8])
    with pytest.raises(DarknetError, match="file ends inside layer 1"):       # mid-layer: cut short
        detector.load_darknet(cfg, first, partial=True)
    first.write_bytes(weights.read_bytes()[:HEADER64])
    with pytest.raises(DarknetError, match=r"file ends where layer 0 .* starts: .*\(a header without weights\)$"):
        detector.load_darknet(cfg, first, partial=True)


def test_oversized_file_says_how_much_is_left_over(small, tmp_path):
    cfg, weights = small
    long = tmp_path / "long.weights"
    long.write_bytes(weights.read_bytes() + bytes(8))
    expected = HEADER64 + 4 * (LAYER0 + LAYER1)
    with pytest.raises(DarknetError) as info:
        detector.load_darknet(cfg, long)
    assert str(info.value).startswith(
        f"{long}: file has {expected + 8} bytes but {cfg} needs exactly {expected}: 8 bytes are "
        f"left after layer 1 ({cfg}:14 [convolutional])")


def test_weights_of_another_cfg_are_refused_and_nothing_is_loaded(shared_data):
    cfg = shared_data("darknet", "yolov3-tiny.cfg")
    model = detector.DarknetModel(detector.parse_cfg(cfg))
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(DarknetError, match="weights for another cfg"):
        detector.read_weights(shared_data("darknet", "yolo-fastest-1.1.weights"), model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_missing_weights_file(small, tmp_path):
    cfg, _ = small
    with pytest.raises(FileNotFoundError, match="nope.weights"):
        detector.load_darknet(cfg, tmp_path / "nope.weights")


def test_a_batchnorm_folded_copy_cannot_be_written(small, tmp_path):
    cfg, weights = small
    model = detector.load_darknet(cfg, weights)
    fused = detector.fused_for_inference(model)
    with pytest.raises(DarknetError, match=r"small.cfg:6 \[convolutional\]: this conv has its "
                                           r"batch norm folded in"):
        detector.write_weights(tmp_path / "fused.weights", fused)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.cfg", "small.weights"]
    assert isinstance(model.layers[0].bn, torch.nn.BatchNorm2d)      # the original is untouched
