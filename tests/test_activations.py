"""Darknet's activations (detector.activations): values against Darknet's formulas, ONNX export,
Darknet export round trip, and OpenCV where its Darknet importer knows the activation (tanh only).

The references are AlexeyAB/darknet's formulas (src/activations.h, activation_kernels.cu) written
out in numpy, evaluated in float64 on the float32 inputs the model sees.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import detector
from detector.cfg import ACTIVATIONS as CFG_ACTIVATIONS
from detector.cfg import DarknetError
from detector.activations import ACTIVATIONS
from detector.export import export_darknet, export_onnx
from detector.layers import BATCHNORM_MOMENTUM, ConvBlock, build_layers
from detector.predict import inference_copy
from helpers import needs_darknet_importer


def _exp(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(x)


DARKNET_FORMULAS = {
    "tanh": lambda x: 2 / (1 + _exp(-2 * x)) - 1,
    "relu6": lambda x: np.minimum(np.maximum(x, 0), 6),
    "elu": lambda x: (x >= 0) * x + (x < 0) * (_exp(np.minimum(x, 0)) - 1),
    "selu": lambda x: (x >= 0) * 1.0507 * x + (x < 0) * 1.0507 * 1.6732 * (_exp(np.minimum(x, 0)) - 1),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(0.797885 * x + 0.035677 * x ** 3)),
    "hard_mish": lambda x: np.where(x > 0, x, np.where(x > -2, x * x / 2 + x, 0.0)),
}
NEW = sorted(DARKNET_FORMULAS)
# Float32 evaluation against the float64 formula: a few float32 roundings of max(1, |value|).
TOLERANCE = 1e-6
# Every regime of every formula: both sides of 0, hard_mish's -2, relu6's 6, saturation far out.
POINTS = np.concatenate([np.linspace(-30, 30, 6001), [-2.0, -1.9999999, -2.0000002, 0.0, -0.0, 1e-7, -1e-7,
                                                       6.0, 5.9999995, 6.0000005]]).astype(np.float32)
NET = "[net]\nwidth={width}\nheight=1\nchannels=1\n\n"
IDENTITY_CONV = "[convolutional]\nfilters=1\nsize=1\nstride=1\nactivation={activation}\n\n"


def _layers(tmp_path, body: str, width: int = POINTS.size) -> list[nn.Module]:
    """The modules of a cfg on a 1 x width single-channel input, every conv the identity (w 1, b 0)."""
    path = tmp_path / "act.cfg"
    path.write_text(NET.format(width=width) + body)
    modules, _ = build_layers(detector.parse_cfg(path))
    with torch.no_grad():
        for module in modules:
            if isinstance(module, ConvBlock):
                module.conv.weight.fill_(1.0)
                module.conv.bias.zero_()
    return modules


def _max_difference(ours: torch.Tensor, x: np.ndarray, name: str) -> float:
    reference = DARKNET_FORMULAS[name](x.astype(np.float64))
    ours = ours.detach().double().numpy().ravel()
    return float((np.abs(ours - reference) / np.maximum(1.0, np.abs(reference))).max())


def test_the_cfg_and_the_module_registry_know_the_same_activations():
    assert set(CFG_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", NEW)
def test_a_conv_activation_matches_darknets_formula(tmp_path, name):
    (conv,) = _layers(tmp_path, IDENTITY_CONV.format(activation=name))
    x = torch.from_numpy(POINTS).view(1, 1, 1, -1)
    with torch.no_grad():
        assert _max_difference(conv(x), POINTS, name) <= TOLERANCE


@pytest.mark.parametrize("name", [name for name in NEW if name != "hard_mish"])
def test_a_shortcut_activation_matches_darknets_formula(tmp_path, name):
    """`from=-1` adds the previous layer to itself: the activation of 2x."""
    conv, shortcut = _layers(tmp_path, IDENTITY_CONV.format(activation="linear")
                             + f"[shortcut]\nfrom=-1\nactivation={name}\n")
    x = torch.from_numpy(POINTS / 2).view(1, 1, 1, -1)
    with torch.no_grad():
        y = conv(x)
        assert _max_difference(shortcut(y, y), POINTS, name) <= TOLERANCE


def test_hard_mish_on_a_shortcut_is_refused(tmp_path):
    """Darknet's shortcut applies it through activate(), which has no hard_mish case: 0 everywhere."""
    path = tmp_path / "act.cfg"
    path.write_text(NET.format(width=4) + IDENTITY_CONV.format(activation="linear")
                    + "[shortcut]\nfrom=-1\nactivation=hard_mish\n")
    with pytest.raises(DarknetError, match=r"act.cfg:14 \[shortcut\] \(layer 1\): option 'activation': hard_mish "
                                           r"on a \[shortcut\] is not supported by yolo-admm .*expected one of "
                                           r"linear, .*, gelu$"):
        detector.parse_cfg(path)


def test_selu_uses_darknets_rounded_constants_not_torchs():
    """torch's SELU (alpha 1.6732632...) is 6.6e-5 away from Darknet's at large negative inputs."""
    x = torch.tensor([-20.0, -1.0, 1.0])
    expected = torch.tensor([1.0507 * 1.6732 * (math.exp(-20) - 1), 1.0507 * 1.6732 * (math.exp(-1) - 1), 1.0507])
    torch.testing.assert_close(ACTIVATIONS["selu"]()(x), expected, rtol=0, atol=1e-6)
    assert (nn.SELU()(x) - expected).abs().max() > 5e-5


# ---- a detector with every new activation: ONNX, Darknet files, OpenCV ----------------------------

def detector_cfg(activations: list[str], shortcut: str = "tanh") -> str:
    """64x64 RGB: per activation a 3x3 conv (batch norm), a shortcut over the last two, a yolo head."""
    convs = "".join(f"[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation={name}\n\n"
                    for name in activations)
    return ("[net]\nwidth=64\nheight=64\nchannels=3\n\n" + convs
            + f"[shortcut]\nfrom=-2\nactivation={shortcut}\n\n[maxpool]\nsize=2\nstride=2\n\n"
            + "[convolutional]\nsize=1\nstride=1\npad=1\nfilters=27\nactivation=linear\n\n"
            + "[yolo]\nmask=0,1,2\nanchors=10,14, 23,27, 37,58\nclasses=4\nnum=3\n")


@torch.no_grad()
def spread_model(tmp_path, activations: list[str], shortcut: str = "tanh", name: str = "acts.cfg"):
    """The detector with seeded weights (variance 1/fan_in) and batch-norm statistics from one pass
    over random images, gamma 4: each activation's input is about N(beta, 16), every regime of the
    formulas, while the batch norms keep the scale from growing layer by layer."""
    path = tmp_path / name
    path.write_text(detector_cfg(activations, shortcut))
    model = detector.load_darknet(path)
    gen = torch.Generator().manual_seed(0)
    batchnorms = []
    for block in model.layers:
        if isinstance(block, ConvBlock):
            bound = math.sqrt(3.0 / block.conv.weight[0].numel())
            block.conv.weight.uniform_(-bound, bound, generator=gen)
            if isinstance(block.bn, nn.BatchNorm2d):
                block.bn.weight.fill_(4.0)
                block.bn.bias.uniform_(-1.0, 1.0, generator=gen)
                block.bn.reset_running_stats()
                block.bn.momentum = None          # cumulative average: one pass = batch statistics
                batchnorms.append(block.bn)
            else:
                block.conv.bias.uniform_(-0.5, 0.5, generator=gen)
    model.train()(torch.rand(4, 3, 64, 64, generator=gen))
    for bn in batchnorms:
        bn.momentum = BATCHNORM_MOMENTUM
    return model.eval()


def activation_inputs(model, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(min, max) of each conv activation's input on `images`, by activation name."""
    ranges, hooks = {}, []
    for block, section in zip(model.layers, model.cfg.layers):
        if isinstance(block, ConvBlock) and section.activation in DARKNET_FORMULAS:
            def record(module, inputs, output, name=section.activation):
                ranges[name] = (float(inputs[0].min()), float(inputs[0].max()))
            hooks.append(block.act.register_forward_hook(record))
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return ranges


def test_onnx_export_of_every_activation_matches_pytorch(tmp_path):
    model = spread_model(tmp_path, NEW)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ranges = activation_inputs(model, images)
    assert set(ranges) == set(NEW) and all(low < -6 and high > 6.5 for low, high in ranges.values()), ranges
    report = export_onnx(model, tmp_path / "acts.onnx", verify=True)
    assert report["onnxruntime_max_rel_diff"] <= 1e-4, report
    ops = {node.op_type for node in onnx.load(str(tmp_path / "acts.onnx")).graph.node}
    assert {"Tanh", "Elu", "Clip", "Where"} <= ops, ops


def test_darknet_export_round_trips_every_activation(tmp_path):
    model = spread_model(tmp_path, NEW, shortcut="selu")
    report = export_darknet(model, tmp_path / "out" / "acts.weights", verify=False)
    reloaded = detector.load_darknet(report["cfg"], report["weights"]).eval()
    assert [s.activation for s in reloaded.cfg.layers if hasattr(s, "activation")] == NEW + ["selu", "linear"]
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for ours, theirs in zip(model(images), reloaded(images)):
            assert torch.equal(ours, theirs)


def test_the_inference_copy_computes_the_same(tmp_path):
    """predict's copy folds the batch norms and runs relu6 and elu in place."""
    model = spread_model(tmp_path, NEW, shortcut="gelu")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for ours, fast in zip(model(images), inference_copy(model)(images)):
            torch.testing.assert_close(fast, ours, rtol=1e-4, atol=1e-3)


@needs_darknet_importer
def test_opencv_runs_tanh_as_we_do(tmp_path):
    model = spread_model(tmp_path, ["tanh", "tanh"])
    report = export_darknet(model, tmp_path / "tanh.weights", verify=True)
    assert report["opencv_max_rel_diff"] <= 1e-4, report


@needs_darknet_importer
@pytest.mark.parametrize("name", ["relu6", "elu", "selu", "gelu", "hard_mish"])
def test_an_activation_opencv_cannot_read_is_refused_before_the_export_is_written(tmp_path, name):
    model = spread_model(tmp_path, [name, "leaky"], shortcut="linear")
    with pytest.raises(ValueError, match=rf"acts.cfg: OpenCV's Darknet importer cannot read this cfg, .*"
                                         rf"leave 'darknet' out of the export formats: .*Unsupported activation: {name}"):
        export_darknet(model, tmp_path / "out" / "acts.weights", verify=True)
    assert not (tmp_path / "out" / "acts.weights").exists() and not (tmp_path / "out" / "acts.cfg").exists()
