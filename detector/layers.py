"""The module graph: one builder per Darknet section type, in a registry keyed by section name.

Each builder turns a typed section record (`detector.cfg`) into a module, the indices of the
layers it reads (`sources`, -1 being the network input) and its output shape at the cfg's input
size. Shapes are checked here, so a cfg whose layers do not fit together fails at build time with
the file, line and layer named. Semantics follow AlexeyAB/darknet: `convolutional_layer.c`,
`maxpool_layer.c` (padding `size-1` in total, `floor` of it before and the rest after),
`route_layer.c` (`groups`/`group_id` take one chunk of each input's channels), `shortcut_layer.c`,
`upsample_layer.c` (nearest), `dropout_layer.c`; activations in `detector.activations`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval

from detector.activations import ACTIVATIONS
from detector.cfg import (ConvolutionalSection, DarknetCfg, DarknetError, DropoutSection,
                          LayerSection, MaxpoolSection, NetConfig, RouteSection, ShortcutSection,
                          UpsampleSection, YoloSection)
from detector.head import YoloHead

# Darknet's batch norm: x_hat = (x - mean) / sqrt(var + .00001f) (blas.c normalize_cpu), and
# rolling = .99 * rolling + .01 * batch statistic (batchnorm_layer.c).
BATCHNORM_EPS = 1e-5
BATCHNORM_MOMENTUM = 0.01


@dataclass(frozen=True)
class Shape:
    """A layer's output (channels, height, width) at the cfg's input size."""

    channels: int
    height: int
    width: int


class ConvBlock(nn.Module):
    """`[convolutional]`: conv, then batch norm when `batch_normalize=1`, then the activation."""

    def __init__(self, in_channels: int, section: ConvolutionalSection):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, section.filters, section.size, section.stride,
                              section.padding, groups=section.groups,
                              bias=not section.batch_normalize)
        self.bn = (nn.BatchNorm2d(section.filters, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)
                   if section.batch_normalize else nn.Identity())
        self.act = ACTIVATIONS[section.activation]()
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_batchnorm(self) -> None:
        """Fold the batch norm (its running statistics) into the conv, for inference only."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
            self.bn = nn.Identity()
        self.fused = True

    def darknet_tensors(self) -> list[torch.Tensor]:
        """The tensors in `.weights` file order: bias (BN beta), [BN gamma, running mean,
        running var,] then the conv weight Tensor[filters, in/groups, size, size]."""
        if self.fused:
            raise DarknetError(f"{self.cfg_source}: this conv has its batch norm folded in "
                               f"(fuse_batchnorm); Darknet tensors come from the unfused model")
        if isinstance(self.bn, nn.BatchNorm2d):
            return [self.bn.bias, self.bn.weight, self.bn.running_mean, self.bn.running_var,
                    self.conv.weight]
        return [self.conv.bias, self.conv.weight]


class MaxPool(nn.Module):
    """`[maxpool]` with Darknet's padding: `padding` in total, `padding // 2` before."""

    def __init__(self, size: int, stride: int, padding: int):
        super().__init__()
        self.size, self.stride = size, stride
        self.before, self.after = padding // 2, padding - padding // 2
        # max_pool2d pads with -inf itself when the padding is symmetric and at most size // 2.
        self.symmetric = self.before == self.after and self.before <= size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return F.max_pool2d(x, self.size, self.stride, padding=self.before)
        pad = (self.before, self.after, self.before, self.after)
        return F.max_pool2d(F.pad(x, pad, value=-math.inf), self.size, self.stride)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, pad=({self.before}, {self.after})"


class Route(nn.Module):
    """`[route]`: concatenate along channels the `group_id`-th of `groups` chunks of each input."""

    def __init__(self, channel_slices: tuple[tuple[int, int], ...]):
        super().__init__()
        self.channel_slices = channel_slices

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        parts = [x[:, start:stop] for x, (start, stop) in zip(inputs, self.channel_slices)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"channel_slices={self.channel_slices}"


class Shortcut(nn.Module):
    """`[shortcut]`: the previous layer's output plus each `from` layer's, then the activation."""

    def __init__(self, activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        for other in others:
            x = x + other
        return self.act(x)


class Upsample(nn.Module):
    """`[upsample]`: nearest-neighbour, integer factor `stride`."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=float(self.stride), mode="nearest")

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


@dataclass
class BuiltLayer:
    module: nn.Module
    sources: tuple[int, ...]   # layer indices read by `module.forward`, in order; -1 = input
    shape: Shape


class BuildContext:
    """What the builders see: the `[net]` input and the layers built so far."""

    def __init__(self, net: NetConfig):
        self.input_shape = Shape(net.channels, net.height, net.width)
        self.net = net
        self.sections: list[LayerSection] = []
        self.shapes: list[Shape] = []

    @property
    def index(self) -> int:
        """Index of the layer being built."""
        return len(self.shapes)

    def error(self, section: LayerSection, message: str) -> DarknetError:
        return DarknetError(f"{section.source} (layer {self.index}): {message}")

    def shape_of(self, layer: int, section: LayerSection) -> Shape:
        """Output shape of an earlier layer (-1: the network input) that `section` reads."""
        if layer < 0:
            return self.input_shape
        if isinstance(self.sections[layer], YoloSection):
            raise self.error(section, f"reads the output of [yolo] layer {layer}; yolo-admm "
                                      f"supports [yolo] only as an output")
        return self.shapes[layer]


def _build_convolutional(section: ConvolutionalSection, ctx: BuildContext) -> BuiltLayer:
    src = ctx.shape_of(ctx.index - 1, section)
    if src.channels % section.groups or section.filters % section.groups:
        raise ctx.error(section, f"groups={section.groups} must divide both the input channels "
                                 f"({src.channels}) and filters ({section.filters})")
    height = (src.height + 2 * section.padding - section.size) // section.stride + 1
    width = (src.width + 2 * section.padding - section.size) // section.stride + 1
    if height < 1 or width < 1:
        raise ctx.error(section, f"kernel size {section.size} does not fit the "
                                 f"{src.height}x{src.width} input")
    module = ConvBlock(src.channels, section)
    return BuiltLayer(module, (ctx.index - 1,), Shape(section.filters, height, width))


def _build_maxpool(section: MaxpoolSection, ctx: BuildContext) -> BuiltLayer:
    src = ctx.shape_of(ctx.index - 1, section)
    height = (src.height + section.padding - section.size) // section.stride + 1
    width = (src.width + section.padding - section.size) // section.stride + 1
    if height < 1 or width < 1:
        raise ctx.error(section, f"size={section.size} padding={section.padding} do not fit "
                                 f"the {src.height}x{src.width} input")
    module = MaxPool(section.size, section.stride, section.padding)
    return BuiltLayer(module, (ctx.index - 1,), Shape(src.channels, height, width))


def _build_route(section: RouteSection, ctx: BuildContext) -> BuiltLayer:
    shapes = [ctx.shape_of(layer, section) for layer in section.layers]
    first = shapes[0]
    slices = []
    for layer, shape in zip(section.layers, shapes):
        if (shape.height, shape.width) != (first.height, first.width):
            raise ctx.error(section, f"layer {layer} is {shape.height}x{shape.width} but layer "
                                     f"{section.layers[0]} is {first.height}x{first.width}; "
                                     f"routed layers must have the same size")
        if shape.channels % section.groups:
            raise ctx.error(section, f"groups={section.groups} does not divide the "
                                     f"{shape.channels} channels of layer {layer}")
        chunk = shape.channels // section.groups
        slices.append((chunk * section.group_id, chunk * (section.group_id + 1)))
    channels = sum(stop - start for start, stop in slices)
    return BuiltLayer(Route(tuple(slices)), section.layers,
                      Shape(channels, first.height, first.width))


def _build_shortcut(section: ShortcutSection, ctx: BuildContext) -> BuiltLayer:
    previous = ctx.shape_of(ctx.index - 1, section)
    for layer in section.layers:
        shape = ctx.shape_of(layer, section)
        if shape != previous:
            raise ctx.error(section, f"layer {layer} output {shape.channels}x{shape.height}x"
                                     f"{shape.width} differs from the previous layer's "
                                     f"{previous.channels}x{previous.height}x{previous.width}")
    return BuiltLayer(Shortcut(section.activation), (ctx.index - 1, *section.layers), previous)


def _build_upsample(section: UpsampleSection, ctx: BuildContext) -> BuiltLayer:
    src = ctx.shape_of(ctx.index - 1, section)
    shape = Shape(src.channels, src.height * section.stride, src.width * section.stride)
    return BuiltLayer(Upsample(section.stride), (ctx.index - 1,), shape)


def _build_dropout(section: DropoutSection, ctx: BuildContext) -> BuiltLayer:
    src = ctx.shape_of(ctx.index - 1, section)
    return BuiltLayer(nn.Dropout(section.probability), (ctx.index - 1,), src)


def _build_yolo(section: YoloSection, ctx: BuildContext) -> BuiltLayer:
    src = ctx.shape_of(ctx.index - 1, section)
    first = next((earlier for earlier in ctx.sections if isinstance(earlier, YoloSection)), None)
    if first is not None and first.classes != section.classes:      # one output row layout for all heads
        raise ctx.error(section, f"expected classes={first.classes} as in the first [yolo] ({first.source}), "
                                 f"found classes={section.classes}")
    expected = len(section.mask) * (5 + section.classes)
    if src.channels != expected:
        raise ctx.error(section, f"expected the layer before to output {expected} channels "
                                 f"(len(mask)={len(section.mask)} x (5 + classes="
                                 f"{section.classes})), found {src.channels}")
    stride_x, stride_y = ctx.net.width / src.width, ctx.net.height / src.height
    if stride_x != stride_y:
        raise ctx.error(section, f"expected the same stride along x and y, found {stride_x:g} and {stride_y:g} "
                                 f"([net] width={ctx.net.width} and height={ctx.net.height} at {src.width}x"
                                 f"{src.height} cells; each should be a multiple of the network's downsampling, "
                                 f"32 in most YOLO cfgs)")
    return BuiltLayer(YoloHead(section, stride_x), (ctx.index - 1,), src)


LAYER_BUILDERS: dict[str, Callable[..., BuiltLayer]] = {
    "convolutional": _build_convolutional,
    "maxpool": _build_maxpool,
    "route": _build_route,
    "shortcut": _build_shortcut,
    "upsample": _build_upsample,
    "dropout": _build_dropout,
    "yolo": _build_yolo,
}


def build_layers(cfg: DarknetCfg) -> tuple[list[nn.Module], list[Shape]]:
    """Build every layer of a parsed cfg, in cfg order.

    Each module gets two plain attributes: `sources` (tuple of the layer indices its forward
    reads, -1 = network input) and `cfg_source` (the `detector.cfg.Source` of its section).

    Returns:
        (modules, shapes): the modules and their output shapes at the cfg's input size.
    """
    ctx = BuildContext(cfg.net)
    modules = []
    for section in cfg.layers:
        try:
            built = LAYER_BUILDERS[section.kind](section, ctx)
        except RuntimeError as err:                   # torch's allocator: "can't allocate memory"
            if "allocate" not in str(err):
                raise
            raise DarknetError(f"{section.source} (layer {len(modules)}): its weights do not fit in memory "
                               f"({str(err).splitlines()[0][:160]}); expected a smaller layer") from None
        built.module.sources = built.sources
        built.module.cfg_source = section.source
        modules.append(built.module)
        ctx.sections.append(section)
        ctx.shapes.append(built.shape)
    return modules, ctx.shapes
