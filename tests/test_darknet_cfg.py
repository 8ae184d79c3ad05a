"""Darknet cfg parsing, the module graph built from it, and the YOLO head decode."""
from __future__ import annotations

import math

import pytest
import torch

import detector
from detector.cfg import DarknetError
from detector import layers as layers_module
from detector.layers import build_layers

NET = "[net]\nwidth={size}\nheight={size}\nchannels={channels}\n\n"

# Darknet's own layer numbering (it prints 0..n-1 while loading) and the head strides.
CANONICAL = {
    "yolov4.cfg": (162, [8, 16, 32]),
    "yolov4-tiny.cfg": (38, [32, 16]),
    "yolov3.cfg": (107, [32, 16, 8]),
    "yolov3-tiny.cfg": (24, [32, 16]),
    "yolov4-csp.cfg": (175, [8, 16, 32]),
    "yolo-fastest-1.1.cfg": (131, [32, 16]),
}


def write_cfg(tmp_path, body: str, size: int = 32, channels: int = 3, name: str = "t.cfg"):
    path = tmp_path / name
    path.write_text(NET.format(size=size, channels=channels) + body)
    return path


def constant_head_cfg(tmp_path, values: list[float], extra: str = "", activation="linear"):
    """A 1-anchor, 1-class head whose raw input is the constant `values` (conv weight 0, bias)."""
    body = (f"[convolutional]\nfilters=6\nsize=1\nstride=32\nactivation={activation}\n\n"
            f"[yolo]\nmask=0\nanchors=10,20\nclasses=1\nnum=1\n{extra}\n")
    model = detector.load_darknet(write_cfg(tmp_path, body, size=64))
    with torch.no_grad():
        model.layers[0].conv.weight.zero_()
        model.layers[0].conv.bias.copy_(torch.tensor(values))
    return model


@pytest.mark.parametrize("name", sorted(CANONICAL))
def test_canonical_cfg_builds_with_darknet_layer_count_and_head_shapes(shared_data, name):
    n_layers, strides = CANONICAL[name]
    model = detector.load_darknet(shared_data("darknet", name))
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 96))
    assert len(model.layers) == n_layers
    assert [head.stride for head in model.heads] == strides
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 64 // s, 96 // s, 85) for s in strides]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_yolo_heads_keep_masked_anchors_and_darknet_loss_defaults(shared_data):
    v4 = detector.load_darknet(shared_data("darknet", "yolov4-tiny.cfg"))
    head = v4.heads[0]
    assert head.mask == [3, 4, 5] and head.num_classes == 80 and not head.new_coords
    assert head.anchors.tolist() == [[81, 82], [135, 169], [344, 319]]
    assert head.all_anchors.shape == (6, 2)
    assert head.scale_x_y == pytest.approx(1.05)
    options = head.loss_options
    assert options["iou_loss"] == "ciou" and options["iou_normalizer"] == pytest.approx(0.07)
    assert options["nms_kind"] == "greedynms" and options["ignore_thresh"] == pytest.approx(0.7)
    # yolov3-tiny sets none of these: Darknet's defaults (parser.c parse_yolo) apply.
    v3 = detector.load_darknet(shared_data("darknet", "yolov3-tiny.cfg")).heads[1].loss_options
    assert v3["iou_loss"] == "mse" and v3["iou_normalizer"] == 0.75 and v3["obj_normalizer"] == 1
    assert v3["max_delta"] == math.inf and v3["iou_thresh"] == 1.0 and v3["beta_nms"] == 0.6
    csp = detector.parse_cfg(shared_data("darknet", "yolov4-csp.cfg"))
    assert [layer.new_coords for layer in csp.layers if layer.kind == "yolo"] == [True] * 3


def test_net_section_is_typed_and_keeps_other_darknet_keys(shared_data, tmp_path):
    net = detector.parse_cfg(shared_data("darknet", "yolov4-csp.cfg")).net
    assert (net.width, net.height, net.channels, net.letter_box) == (512, 512, 3, True)
    assert (net.batch, net.subdivisions, net.mosaic, net.ema_alpha) == (64, 8, True, 0.9998)
    assert net.steps == (400000, 450000) and net.scales == (0.1, 0.1)
    assert net.policy == "steps" and net.momentum == 0.949 and net.hue == 0.1
    cfg = write_cfg(tmp_path, "[maxpool]\n").read_text().replace(
        "[net]\n", "[net]\noptimized_memory=1\nresize_step = 64\n")
    (tmp_path / "o.cfg").write_text(cfg)
    other = detector.parse_cfg(tmp_path / "o.cfg").net
    assert other.options == {"optimized_memory": "1", "resize_step": "64"}
    assert other.letter_box is False and other.learning_rate == 0.001   # Darknet defaults


def test_maxpool_size2_stride1_pads_right_and_bottom_like_darknet(shared_data, tmp_path):
    modules, shapes = build_layers(detector.parse_cfg(shared_data("darknet", "yolov3-tiny.cfg")))
    assert shapes[11] == shapes[10]                  # the size=2 stride=1 maxpool keeps 13x13
    path = write_cfg(tmp_path, "[maxpool]\nsize=2\nstride=1\n", size=5, channels=1)
    (pool,), (shape,) = build_layers(detector.parse_cfg(path))
    x = torch.randn(1, 1, 5, 5)
    padded = torch.full((7, 7), -math.inf)
    padded[:5, :5] = x[0, 0]                         # Darknet: offset -pad/2 = 0, -inf outside
    expected = torch.tensor([[padded[i:i + 2, j:j + 2].max() for j in range(5)]
                             for i in range(5)])
    assert (shape.height, shape.width) == (5, 5)
    assert torch.equal(pool(x)[0, 0], expected)


@pytest.mark.parametrize("options, size, stride", [("stride_x=2\nstride_y=2\n", 1, 2), ("stride=2\n", 2, 2),
                                                  ("stride=3\n", 3, 3), ("size=3\nstride_x=2\nstride_y=2\n", 3, 2)])
def test_a_maxpools_default_size_is_its_stride_option_not_stride_x(tmp_path, options, size, stride):
    """Found by a review: the default size came from stride_x. Darknet's parser reads `stride`
    (default 1), then stride_x / stride_y, and `size` defaults to `stride`."""
    (section,) = detector.parse_cfg(write_cfg(tmp_path, "[maxpool]\n" + options)).layers
    assert (section.size, section.stride) == (size, stride)


def test_odd_cfg_sizes_run_though_their_head_stride_is_inexact_in_floats(tmp_path):
    """Found by a review: a stride of 31 / 15 times 15 is not 31 in floats, so a model refused its own
    31x31 input (likewise 27, 55, 99, 107)."""
    body = ("[convolutional]\nfilters=8\nsize=3\nstride=2\npad=0\nactivation=leaky\n\n"
            "[convolutional]\nfilters=6\nsize=1\nstride=1\nactivation=linear\n\n"
            "[yolo]\nmask=0\nanchors=10,20\nclasses=1\nnum=1\n")
    for size in (27, 31, 55, 99, 107):
        model = detector.load_darknet(write_cfg(tmp_path, body, size=size)).eval()
        grid = (size - 3) // 2 + 1
        assert model(torch.zeros(1, 3, size, size))[0].shape[2:4] == (grid, grid)


def test_route_groups_take_the_group_id_chunk_of_each_input(tmp_path):
    body = ("[convolutional]\nfilters=4\nsize=1\nactivation=linear\n\n"
            "[convolutional]\nfilters=6\nsize=1\nactivation=linear\n\n"
            "[route]\nlayers=-2,-1\ngroups=2\ngroup_id=1\n")
    modules, shapes = build_layers(detector.parse_cfg(write_cfg(tmp_path, body)))
    assert modules[2].sources == (0, 1) and shapes[2].channels == 2 + 3
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 8, 8)
    assert torch.equal(modules[2](a, b), torch.cat([a[:, 2:], b[:, 3:]], dim=1))


def test_decode_matches_darknet_formulas(tmp_path):
    raw_values = [0.3, -0.4, 0.5, -0.2, 1.0, -1.0]            # tx, ty, tw, th, obj, cls
    model = constant_head_cfg(tmp_path, raw_values, extra="scale_x_y=1.1")
    out = model(torch.zeros(1, 3, 64, 64))[0]
    assert out.shape == (1, 1, 2, 2, 6)
    sig = [1 / (1 + math.exp(-v)) for v in raw_values]
    for row in range(2):
        for col in range(2):
            cx = (sig[0] * 1.1 - 0.05 + col) * 32
            cy = (sig[1] * 1.1 - 0.05 + row) * 32
            expected = [cx, cy, math.exp(0.5) * 10, math.exp(-0.2) * 20, sig[4], sig[5]]
            assert out[0, 0, row, col].tolist() == pytest.approx(expected, rel=1e-6)


def test_decode_new_coords_uses_logistic_inputs_as_they_are(tmp_path):
    model = constant_head_cfg(tmp_path, [0.0] * 6, extra="scale_x_y=2.0\nnew_coords=1",
                              activation="logistic")     # every raw value is sigmoid(0) = 0.5
    out = model(torch.zeros(1, 3, 64, 64))[0]
    cx = (0.5 * 2.0 - 0.5 + 1) * 32                         # col 1
    assert out[0, 0, 0, 1].tolist() == pytest.approx([cx, 16.0, 10.0, 20.0, 0.5, 0.5])


def test_train_mode_returns_raw_and_decode_gives_the_eval_output(tmp_path):
    model = constant_head_cfg(tmp_path, [0.3, -0.4, 0.5, -0.2, 1.0, -1.0])
    x = torch.zeros(2, 3, 64, 32)
    evaluated = model.eval()(x)[0]
    raw = model.train()(x)[0]
    assert raw.shape == (2, 1, 2, 1, 6)
    assert torch.equal(raw[1, 0, 1, 0], torch.tensor([0.3, -0.4, 0.5, -0.2, 1.0, -1.0]))
    assert torch.equal(detector.decode(raw, model.heads[0]), evaluated)


def test_an_input_size_the_downsampling_does_not_divide_is_refused(tmp_path):
    """width=100 with five stride-2 convs (100 -> 50 -> 25 -> 13 -> 7 -> 4): the 4x4 grid tiles the
    cfg's own 100x100 with stride 25, but at 125x125 (a multiple of 25) the grid is 4x4 again, whose
    true stride 31.25 the boxes would not be decoded with."""
    conv = "[convolutional]\nbatch_normalize=1\nfilters=6\nsize=3\nstride=2\npad=1\nactivation=leaky\n\n"
    body = conv * 5 + "[yolo]\nmask=0\nanchors=10,20\nclasses=1\nnum=1\n"
    model = detector.load_darknet(write_cfg(tmp_path, body, size=100)).eval()
    assert model.input_multiple == 25 and model(torch.zeros(1, 3, 100, 100))[0].shape[2:4] == (4, 4)
    with pytest.raises(ValueError, match=r"at input 125x125 layer 5 \(\[yolo\]\) has a 4x4 grid, which does not tile"):
        model(torch.zeros(1, 3, 125, 125))


def test_unpadded_convolutions_run_at_the_cfgs_own_size(tmp_path):
    """Found by a cfg fuzz: three size-3 stride-2 convs without padding (64 -> 31 -> 15 -> 7) loaded,
    then the model refused its own 64x64 as not a multiple of 9 (64 // 7). Darknet and OpenCV run it."""
    conv = "[convolutional]\nbatch_normalize=1\nfilters=6\nsize=3\nstride=2\npad=0\nactivation=leaky\n\n"
    body = conv * 3 + "[yolo]\nmask=0\nanchors=10,20\nclasses=1\nnum=1\n"
    model = detector.load_darknet(write_cfg(tmp_path, body, size=64)).eval()
    assert model(torch.zeros(1, 3, 64, 64))[0].shape[2:4] == (7, 7)


def test_input_size_must_be_a_multiple_of_the_network_stride(tmp_path):
    model = constant_head_cfg(tmp_path, [0.0] * 6)
    with pytest.raises(ValueError, match=r"multiples of 32 \(or the cfg.s \d+x\d+\), found 48x64"):
        model(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"Tensor\[B, 3, H, W\]"):
        model(torch.zeros(1, 1, 64, 64))


@pytest.mark.parametrize("body, line, section, message", [
    ("[convolutional]\nfilters=4\n\n[foo]\nsize=3\n", 9, "foo", "unknown or unsupported section"),
    ("[convolutional]\nfilters=abc\n", 7, "convolutional",
     "option 'filters': expected an integer, found 'abc'"),
    ("[convolutional]\nfilters=4\nfliters=3\n", 8, "convolutional", "unknown option 'fliters'"),
    ("[convolutional]\nactivation=hardtan\n", 7, "convolutional",
     "option 'activation': expected one of linear, leaky, relu, mish, swish, logistic, tanh, relu6, elu, selu, "
     "gelu, hard_mish; found 'hardtan'"),
    # Darknet keeps a comment after a text value: "mish#m" is an unknown activation to it (ReLU).
    ("[convolutional]\nfilters=4 # four\nactivation=mish # m\n", 8, "convolutional",
     "option 'activation': expected a name without a trailing comment, found 'mish#m'; Darknet keeps a comment "
     "in a text value, so it would read the unknown activation 'mish#m' and use ReLU instead"),
    ("[convolutional]\n\n[shortcut]\nfrom=-1\nactivation=linear;plain\n", 10, "shortcut",
     "option 'activation': expected a name without a trailing comment, found 'linear;plain'"),
    ("[yolo]\nnum=1\nanchors=1,2 # one pair\niou_loss=ciou ; best\n", 9, "yolo",
     "option 'iou_loss': expected a name without a trailing comment, found 'ciou;best'; Darknet keeps a comment "
     "in a text value, so it would read the unknown iou_loss 'ciou;best': remove the comment"),
    # ... and counts the commas of a list's comment too: this route would have two layers (-1, 0) to it.
    ("[maxpool]\nsize=2\n\n[route]\nlayers=-1 # a,b\n", 10, "route",
     "option 'layers': expected a list without a comma in its trailing comment, found '-1#a,b'; Darknet counts "
     "the comment's commas too"),
    ("[yolo]\nnum=2\nmask=0,1 ; small, medium\nanchors=1,2,3,4\n", 8, "yolo",   # ';': Darknet counts on
     "option 'mask': expected a list without a comma in its trailing comment, found '0,1;small,medium'"),
    ("[maxpool]\nsize=2\n\n[route]\nlayers=-1,4\n", 10, "route",
     "layer 4 resolves to 4; expected an earlier layer (0..0)"),
    ("[convolutional]\nfilters=4\nsize=0\n", 8, "convolutional",
     "option 'size': expected an integer >= 1, found 0"),
    ("[convolutional]\ndilation=2\n", 7, "convolutional",
     "option 'dilation': only dilation=1 is supported by yolo-admm, found 2"),
    ("[convolutional]\nfilters=1_6\n", 7, "convolutional", "option 'filters': expected an integer, found '1_6'"),
    ("[convolutional]\nfilters=\uff11\uff16\n", 7, "convolutional", "option 'filters': expected an integer"),
    ("[convolutional]\nstride_x=2\nstride_y=1\n", 7, "convolutional",
     "stride_x=2 and stride_y=1: only one stride for both axes is supported by yolo-admm"),
    ("[yolo]\nnum=1\nanchors=1_0,2\n", 8, "yolo", "option 'anchors': expected comma-separated numbers"),
    ("[yolo]\nmask=0,3\nnum=3\nanchors=1,2,3,4,5,6\n", 7, "yolo",
     "option 'mask': expected distinct anchor indices in 0..2"),
    ("[yolo]\nnum=2\nanchors=1,2,3\n", 8, "yolo", "option 'anchors': expected 4 positive"),
])
def test_cfg_errors_name_file_line_and_section(tmp_path, body, line, section, message):
    path = write_cfg(tmp_path, body)
    with pytest.raises(DarknetError) as info:
        detector.parse_cfg(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line} [{section}]"), text
    assert message in text


def test_cfgs_darknet_and_opencv_read_are_read_alike(tmp_path, monkeypatch):
    """Found by a cfg fuzz: each of these was refused (or, for a huge layer, a bare allocation error).
    A comment after a number is dropped, as Darknet's atoi/atof stop there (after a name it is an error)."""
    head = "[yolo]\nmask=0\nanchors=10,20\nclasses=1\nnum=1\n"
    plain = "[convolutional]\nfilters=6\nsize=3\nstride=2\npad=1\nactivation=leaky\n\n"
    spelled = ("[convolutional]\nfilters=6 ; six\nsize=3\nstride_x=2\nstride_y=2\ndilation=1\n"
               "antialiasing=0\nbinary=0\nxnor=0\npad=1 # as the plain one\nactivation=leaky\n\n")
    thresholds = "thresh=0.25\nnms_threshold=0.45\nshow_details=1\n"
    torch.manual_seed(0)
    reference = detector.load_darknet(write_cfg(tmp_path, plain + head, name="plain.cfg")).eval()
    path = write_cfg(tmp_path, spelled + head + thresholds, name="spelled.cfg")
    path.write_bytes("\ufeff".encode() + path.read_bytes())                 # a UTF-8 byte order mark
    spelled_model = detector.load_darknet(path).eval()
    spelled_model.load_state_dict(reference.state_dict())
    image = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(spelled_model(image), reference(image), rtol=0, atol=0)
    huge = "[convolutional]\nfilters=100000000000\nsize=3\n\n" + head   # torch would try 10.8 TB: simulated

    def out_of_memory(section, ctx):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10800000000000 bytes.")
    monkeypatch.setitem(layers_module.LAYER_BUILDERS, "convolutional", out_of_memory)
    with pytest.raises(DarknetError, match=r"huge.cfg:6 \[convolutional\] \(layer 0\): its weights do not fit in "
                                           r"memory .*you tried to allocate 10800000000000 bytes.*; expected a smaller"):
        detector.load_darknet(write_cfg(tmp_path, huge, name="huge.cfg"))


def test_build_errors_name_the_layer_and_what_was_expected(tmp_path):
    body = ("[convolutional]\nfilters=100\nsize=1\n\n"
            "[yolo]\nclasses=80\nmask=0,1,2\nnum=3\nanchors=" + ",".join(["10"] * 6) + "\n")
    with pytest.raises(DarknetError) as info:
        detector.load_darknet(write_cfg(tmp_path, body))
    assert str(info.value).startswith(f"{tmp_path / 't.cfg'}:10 [yolo] (layer 1): expected the "
                                      f"layer before to output 255 channels")
    assert "found 100" in str(info.value)
    to_yolo = body + "\n[route]\nlayers=-1\n"
    with pytest.raises(DarknetError, match=r":16 \[route\] \(layer 2\): reads the output of "
                                           r"\[yolo\] layer 1"):
        build_layers(detector.parse_cfg(write_cfg(tmp_path, to_yolo.replace("100", "255"))))
    groups = ("[convolutional]\nfilters=4\nsize=1\ngroups=2\n\n"
              "[convolutional]\nfilters=3\ngroups=2\n")
    with pytest.raises(DarknetError, match=r":11 \[convolutional\] \(layer 1\): groups=2 must"):
        build_layers(detector.parse_cfg(write_cfg(tmp_path, groups, channels=4)))
    # found by a review: heads of other class counts built, then failed joining their rows
    two_heads = ("[convolutional]\nfilters=14\nsize=1\n\n[yolo]\nclasses=2\nmask=0,1\nnum=2\nanchors=1,1,2,2\n\n"
                 "[route]\nlayers=-2\n\n[convolutional]\nfilters=16\nsize=1\n\n"
                 "[yolo]\nclasses=3\nmask=0,1\nnum=2\nanchors=1,1,2,2\n")
    with pytest.raises(DarknetError, match=r":23 \[yolo\] \(layer 4\): expected classes=2 as in the first \[yolo\] "
                                           r"\(.*t.cfg:10 \[yolo\]\), found classes=3"):
        build_layers(detector.parse_cfg(write_cfg(tmp_path, two_heads)))
    # found by a review: a [net] width that is no multiple of 32 was named only by the strides it made
    strided = ("[convolutional]\nfilters=6\nsize=1\nstride=32\n\n"
               "[yolo]\nmask=0\nanchors=10,20\nclasses=1\nnum=1\n")
    narrow = write_cfg(tmp_path, strided, size=320)
    narrow.write_text(narrow.read_text().replace("width=320", "width=300", 1))
    with pytest.raises(DarknetError, match=r"expected the same stride along x and y, found 30 and 32 \(\[net\] "
                                           r"width=300 and height=320 at 10x10 cells; each should be a multiple"):
        build_layers(detector.parse_cfg(narrow))


def test_missing_files_and_bad_net_section(tmp_path):
    with pytest.raises(FileNotFoundError):
        detector.parse_cfg(tmp_path / "missing.cfg")
    (tmp_path / "n.cfg").write_text("[net]\nwidth=32\nheight=32\n\n[maxpool]\n")
    with pytest.raises(DarknetError, match=r"n.cfg:1 \[net\]: option 'channels' is required"):
        detector.parse_cfg(tmp_path / "n.cfg")
    (tmp_path / "c.cfg").write_text("[convolutional]\nfilters=2\n")
    with pytest.raises(DarknetError, match=r"c.cfg:1 \[convolutional\]: expected the first "):
        detector.parse_cfg(tmp_path / "c.cfg")
    (tmp_path / "model.weights").write_bytes(b"\x00\x00\x00\x00\x02\x00\x00\x00" + bytes(range(256)))
    with pytest.raises(DarknetError, match=r"model.weights: expected a Darknet cfg \(text\), found binary data"):
        detector.parse_cfg(tmp_path / "model.weights")     # a fuzz found the garbage quoted back


def test_a_hash_comment_with_commas_after_mask_or_anchors_is_dropped_as_darknet_does(tmp_path):
    """Found by a review: mask, anchors and counters_per_class stop counting commas at a '#' in
    Darknet's parser, so there such a comment is fine (after a route's layers it is not)."""
    body = ("[convolutional]\nfilters=12\nsize=1\nstride=32\nactivation=linear\n\n"
            "[yolo]\nmask=1 # the larger anchor, of two\nanchors=10,20, 30,40 # (w,h) pairs\nclasses=1\nnum=2\n")
    head = next(layer for layer in detector.parse_cfg(write_cfg(tmp_path, body, size=64)).layers
                if layer.kind == "yolo")
    assert (head.mask, head.anchors) == ((1,), ((10.0, 20.0), (30.0, 40.0)))


def test_with_input_size_rewrites_only_the_net_size_lines(tmp_path):
    from detector.cfg import first_difference, parse_cfg, with_input_size

    text = ("# a comment\n[network]\nbatch=4\nwidth = 416 # the input\nchannels=3\nheight=416\n\n"
            "[convolutional]\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n")
    (tmp_path / "a.cfg").write_text(text)
    resized = with_input_size(parse_cfg(tmp_path / "a.cfg"), 160, 96)
    assert (resized.net.width, resized.net.height) == (160, 96)
    assert resized.text.splitlines() == ["# a comment", "[network]", "batch=4", "width=160", "channels=3",
                                         "height=96", "", "[convolutional]", "filters=8", "size=3", "stride=1",
                                         "pad=1", "activation=leaky"]
    (tmp_path / "b.cfg").write_text(resized.text)
    assert first_difference(parse_cfg(tmp_path / "b.cfg"), resized) is None
