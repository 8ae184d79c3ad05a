"""Darknet `.cfg` parsing into typed, validated section records.

A cfg is a list of `[section]` headers, each followed by `key=value` lines. Darknet removes all
whitespace from a line and skips empty lines and lines starting with `#` or `;`. A `#` or `;`
comment after a number is dropped here, as Darknet's number parsers stop there too. After a text
value (one of a fixed set of names, such as `activation`) it is an error: Darknet keeps the comment
in the value (`read_option` splits at `=` only), so `activation=mish # m` is the unknown activation
"mish#m" to Darknet, which warns and uses ReLU (OpenCV refuses it). After a list, a comment is dropped
unless it holds a comma, which is an error: Darknet counts every comma of the value to know how many
entries to read, so `layers=-1,-3 # a,b` would be a route of three layers to it (`mask`, `anchors`
and `counters_per_class` stop counting at a `#`: there only a `;` comment with a comma is refused).
The first section is `[net]`; every later section is one layer, numbered from 0 in file order
(route and shortcut indices count every section, `[dropout]` and `[yolo]` included).

Defaults and meanings follow AlexeyAB/darknet `src/parser.c` (`parse_net_options`,
`parse_convolutional`, `parse_maxpool`, `parse_route`, `parse_shortcut`, `parse_upsample`,
`parse_dropout`, `parse_yolo`). Unlike Darknet, which warns and carries on, anything this code
cannot honour is an error: an unknown section or option, a value of the wrong type or range, an
option Darknet knows but this implementation does not support. Every error is a `DarknetError`
whose message starts with `file:line [section]`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, ClassVar, Union


class DarknetError(ValueError):
    """Bad Darknet input (cfg or weights). The message names the file, line or layer."""


@dataclass(frozen=True)
class Source:
    """Where a section starts: cfg file, 1-based line of its `[header]`, section name; and each
    option written in it, with its line and its value as read (without a trailing comment)."""

    path: str
    line: int
    section: str
    options: tuple[tuple[str, int, str], ...] = field(default=(), compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.path}:{self.line} [{self.section}]"

    def of(self, key: str) -> str:
        """"path:line [section]" with the line of option `key`, or the header's where it is not written."""
        line = next((line for name, line, _ in self.options if name == key), self.line)
        return f"{self.path}:{line} [{self.section}]"

    def written(self, key: str) -> str | None:
        """Option `key`'s value as written (without a trailing comment), or None where it is not."""
        return next((value for name, _, value in self.options if name == key), None)


ACTIVATIONS = ("linear", "leaky", "relu", "mish", "swish", "logistic", "tanh", "relu6", "elu", "selu",
               "gelu", "hard_mish")
# Darknet's shortcut layer applies hard_mish through its generic activate(), which has no hard_mish
# case and returns 0 (CPU and GPU): refused there.
SHORTCUT_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name != "hard_mish")

# Options Darknet reads for every layer section (parser.c, end of parse_network_cfg_custom); they
# only steer training, so they are kept as given: flags it reads as integers, and two numbers it
# applies to layers with weights, with the values at which they change nothing.
LAYER_TRAINING_FLAGS = ("stopbackward", "train_only_bn", "dont_update", "burnin_update", "onlyforward")
LAYER_WEIGHT_OPTIONS = {"learning_rate": 1.0, "clip": 0.0}
_LAYER_TRAINING_KEYS = LAYER_TRAINING_FLAGS + tuple(LAYER_WEIGHT_OPTIONS)

# [net] keys Darknet's parse_net_options knows besides the typed ones of NetConfig: kept verbatim.
_NET_OTHER_KEYS = frozenset((
    "learning_rate_min", "sgdr_cycle", "sgdr_mult", "time_steps", "track", "augment_speed",
    "sequential_subdivisions", "try_fix_nan", "weights_reject_freq", "equidistant_point",
    "badlabels_rejection_percentage", "num_sigmas_reject_badlabels", "use_cuda_graph",
    "loss_scale", "dynamic_minibatch", "optimized_memory", "workspace_size_limit_MB", "adam",
    "B1", "B2", "eps", "inputs", "max_crop", "min_crop", "gaussian_noise", "mosaic_bound",
    "contrastive", "contrastive_jit_flip", "contrastive_color", "unsupervised", "resize_step",
    "attention", "adversarial_lr", "max_chart_loss", "power", "step", "scale", "seq_scales",
    "gamma", "show_receptive_field",
))


@dataclass(frozen=True)
class NetConfig:
    """The `[net]` section. Input geometry plus the training options, with Darknet's defaults.

    `batch` and `subdivisions` are as written in the cfg (Darknet's mini-batch is their ratio).
    `options` keeps every other Darknet `[net]` key verbatim (string values).
    """

    source: Source
    width: int
    height: int
    channels: int
    letter_box: bool
    batch: int = 1
    subdivisions: int = 1
    momentum: float = 0.9
    decay: float = 0.0001
    learning_rate: float = 0.001
    burn_in: int = 0
    max_batches: int = 0
    policy: str = "constant"
    steps: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()
    angle: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0
    hue: float = 0.0
    aspect: float = 1.0
    flip: bool = True
    blur: int = 0
    mosaic: bool = False
    cutmix: bool = False
    mixup: bool = False
    label_smooth_eps: float = 0.0
    ema_alpha: float = 0.0
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvolutionalSection:
    kind: ClassVar[str] = "convolutional"
    source: Source
    filters: int
    size: int
    stride: int
    padding: int          # per side; `pad=1` means size // 2
    groups: int
    batch_normalize: bool
    activation: str
    training: dict[str, float]


@dataclass(frozen=True)
class MaxpoolSection:
    kind: ClassVar[str] = "maxpool"
    source: Source
    size: int
    stride: int
    padding: int          # total; floor(padding/2) before, the rest after (maxpool_layer.c)
    training: dict[str, float]


@dataclass(frozen=True)
class RouteSection:
    kind: ClassVar[str] = "route"
    source: Source
    layers: tuple[int, ...]   # absolute layer indices
    groups: int
    group_id: int
    training: dict[str, float]


@dataclass(frozen=True)
class ShortcutSection:
    kind: ClassVar[str] = "shortcut"
    source: Source
    layers: tuple[int, ...]   # absolute indices of the `from` layers, added to the previous layer
    activation: str
    training: dict[str, float]


@dataclass(frozen=True)
class UpsampleSection:
    kind: ClassVar[str] = "upsample"
    source: Source
    stride: int
    training: dict[str, float]


@dataclass(frozen=True)
class DropoutSection:
    kind: ClassVar[str] = "dropout"
    source: Source
    probability: float
    training: dict[str, float]


@dataclass(frozen=True)
class YoloSection:
    kind: ClassVar[str] = "yolo"
    source: Source
    classes: int
    num: int
    mask: tuple[int, ...]
    anchors: tuple[tuple[float, float], ...]   # all `num` anchors (w, h) in input pixels
    scale_x_y: float
    new_coords: bool
    loss_options: dict[str, object]
    training: dict[str, float]


LayerSection = Union[ConvolutionalSection, MaxpoolSection, RouteSection, ShortcutSection,
                     UpsampleSection, DropoutSection, YoloSection]


@dataclass(frozen=True)
class DarknetCfg:
    """A parsed cfg: the `[net]` section and the layer sections in file order; `text` is the file's
    text as it was read (so exports write the cfg the model was built from, whatever becomes of the file)."""

    path: str
    net: NetConfig
    layers: tuple[LayerSection, ...]
    text: str


_LISTS_ENDING_AT_HASH = {"mask", "anchors", "counters_per_class"}   # parser.c's parse_yolo_mask, parse_yolo


@dataclass
class _RawSection:
    name: str
    line: int
    # key -> (value, line, value as written): the value without, the written one with, a trailing comment
    options: dict[str, tuple[str, int, str]] = field(default_factory=dict)


class _Options:
    """Typed access to one section's options. Reading marks a key as used; `finish` rejects the
    rest, as Darknet's `option_unused` would report them."""

    def __init__(self, raw: _RawSection, path: str, index: int):
        self.source = Source(path, raw.line, raw.name,
                             tuple((key, line, value) for key, (value, line, _) in raw.options.items()))
        self.index = index
        self._raw = raw
        self._unused = set(raw.options)

    def error(self, message: str, key: str | None = None) -> DarknetError:
        line = self._raw.options[key][1] if key in self._raw.options else self._raw.line
        where = f"{self.source.path}:{line} [{self.source.section}]"
        if self.index >= 0:
            where += f" (layer {self.index})"
        return DarknetError(f"{where}: {message}")

    def has(self, key: str) -> bool:
        return key in self._raw.options

    def text(self, key: str, default: str | None = None) -> str | None:
        if key not in self._raw.options:
            return default
        self._unused.discard(key)
        return self._raw.options[key][0]

    def _convert(self, key: str, default, convert: Callable[[str], object], expected: str):
        value = self.text(key)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError:
            raise self.error(f"option '{key}': expected {expected}, found {value!r}", key) from None

    def integer(self, key: str, default: int | None, minimum: int | None = None) -> int:
        value = self._convert(key, default, _strict_int, "an integer")
        if value is None:
            raise self.error(f"option '{key}' is required")
        if minimum is not None and value < minimum:
            raise self.error(f"option '{key}': expected an integer >= {minimum}, "
                             f"found {value}", key)
        return value

    def number(self, key: str, default: float, minimum: float | None = None) -> float:
        value = self._convert(key, default, _finite_float, "a number")
        if minimum is not None and value < minimum:
            raise self.error(f"option '{key}': expected a number >= {minimum}, found {value}", key)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._convert(key, int(default), _strict_int, "0 or 1")
        if value not in (0, 1):
            raise self.error(f"option '{key}': expected 0 or 1, found {value}", key)
        return bool(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(key, default)
        written = self._raw.options[key][2] if key in self._raw.options else value
        if written != value:
            fallback = " and use ReLU instead" if key == "activation" else ""
            raise self.error(f"option '{key}': expected a name without a trailing comment, found "
                             f"{written!r}; Darknet keeps a comment in a text value, so it would read the "
                             f"unknown {key} {written!r}{fallback}: remove the comment or move it to its "
                             f"own line", key)
        if value not in choices:
            raise self.error(f"option '{key}': expected one of {', '.join(choices)}; "
                             f"found {value!r}", key)
        return value

    def _check_list_comment(self, key: str) -> None:
        """A comment after a list must hold no comma where Darknet counts the commas of the whole
        value, comment included, to know how many entries to read: all lists but those whose parser
        stops at a `#` (`_LISTS_ENDING_AT_HASH`)."""
        if key in self._raw.options:
            value, _, written = self._raw.options[key]
            comment = written[len(value):]
            if "," in comment and not (key in _LISTS_ENDING_AT_HASH and comment.startswith("#")):
                raise self.error(f"option '{key}': expected a list without a comma in its trailing comment, found "
                                 f"{written!r}; Darknet counts the comment's commas too, so it would read more "
                                 f"entries than the list has: remove the comment or move it to its own line", key)

    def integers(self, key: str, default: tuple[int, ...] | None) -> tuple[int, ...]:
        self._check_list_comment(key)
        value = self._convert(key, default, _int_list, "comma-separated integers")
        if value is None:
            raise self.error(f"option '{key}' is required")
        return value

    def numbers(self, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        self._check_list_comment(key)
        return self._convert(key, default, _float_list, "comma-separated numbers")

    def training(self) -> dict[str, float]:
        """The per-layer training options Darknet accepts on any layer section."""
        return {key: self.number(key, 0.0) for key in _LAYER_TRAINING_KEYS if self.has(key)}

    def reject(self, *keys: str) -> None:
        """Darknet options this implementation does not honour: an error when present."""
        for key in keys:
            if self.has(key):
                raise self.error(f"option '{key}' is not supported by yolo-admm", key)

    def only(self, key: str, value: int) -> None:
        """A Darknet option this implementation honours at one value only (its default, say
        `dilation=1`): an error when given another."""
        found = self.integer(key, value)
        if found != value:
            raise self.error(f"option '{key}': only {key}={value} is supported by yolo-admm, found {found}", key)

    def ignore(self, *keys: str) -> None:
        """Options that do not change the network (say `[yolo] thresh`, which OpenCV's importer
        reads as its detection threshold): read, so that they are not unknown, and dropped."""
        for key in keys:
            self.text(key)

    def finish(self) -> None:
        if self._unused:
            key = min(self._unused, key=lambda k: self._raw.options[k][1])
            raise self.error(f"unknown option '{key}'", key)


_INTEGER = re.compile(r"[+-]?[0-9]+")                              # ASCII digits: atoi reads no others
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _strict_int(text: str) -> int:
    """An integer as Darknet writes one (Python's int() also takes "1_6", which atoi reads as 1)."""
    if not _INTEGER.fullmatch(text):
        raise ValueError(text)
    return int(text)


def _finite_float(text: str) -> float:
    """A finite decimal number (Python's float() also takes "1_0", "nan" and "inf")."""
    if not _NUMBER.fullmatch(text):
        raise ValueError(text)
    return float(text)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_strict_int(part) for part in text.split(","))


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(_finite_float(part) for part in text.split(","))


def _read_text(path: Path) -> str:
    """The cfg file's text (a UTF-8 byte-order mark dropped)."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except IsADirectoryError:
        raise DarknetError(f"{path}: expected a Darknet cfg file, found a directory") from None
    if "\x00" in text:
        raise DarknetError(f"{path}: expected a Darknet cfg (text), found binary data (a .weights file?)")
    return text


def _read_sections(text: str, path: Path) -> list[_RawSection]:
    """Split a cfg's text into raw sections the way Darknet's `read_cfg` does."""
    sections: list[_RawSection] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = "".join(line.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise DarknetError(f"{path}:{number}: expected a section header like [name], "
                                   f"found {line!r}")
            sections.append(_RawSection(line[1:-1], number))
            continue
        key, sep, written = line.partition("=")
        value = re.split("[#;]", written, maxsplit=1)[0]          # a trailing comment
        if not sections:
            raise DarknetError(f"{path}:{number}: expected a [section] header before options, "
                               f"found {line!r}")
        if not sep or not key or not value:
            raise DarknetError(f"{path}:{number} [{sections[-1].name}]: expected key=value, "
                               f"found {line!r}")
        if key in sections[-1].options:
            raise DarknetError(f"{path}:{number} [{sections[-1].name}]: option '{key}' given "
                               f"twice (first on line {sections[-1].options[key][1]})")
        sections[-1].options[key] = (value, number, written)
    return sections


def _parse_net(opts: _Options) -> NetConfig:
    policy = opts.choice("policy", "constant", ("constant", "step", "steps", "exp", "poly",
                                                "sigmoid", "random", "sgdr"))
    steps = opts.integers("steps", ())
    scales = opts.numbers("scales", ())
    if policy == "steps" and (not steps or len(scales) != len(steps)):
        raise opts.error(f"policy=steps needs steps and as many scales; found {len(steps)} "
                         f"steps and {len(scales)} scales", "scales")
    net = NetConfig(
        source=opts.source,
        width=opts.integer("width", None, minimum=1),
        height=opts.integer("height", None, minimum=1),
        channels=opts.integer("channels", None, minimum=1),
        letter_box=opts.flag("letter_box", False),
        batch=opts.integer("batch", 1, minimum=1),
        subdivisions=opts.integer("subdivisions", 1, minimum=1),
        momentum=opts.number("momentum", 0.9), decay=opts.number("decay", 0.0001),
        learning_rate=opts.number("learning_rate", 0.001, minimum=0.0),
        burn_in=opts.integer("burn_in", 0, minimum=0),
        max_batches=opts.integer("max_batches", 0, minimum=0),
        policy=policy, steps=steps, scales=scales,
        angle=opts.number("angle", 0.0), saturation=opts.number("saturation", 1.0),
        exposure=opts.number("exposure", 1.0), hue=opts.number("hue", 0.0),
        aspect=opts.number("aspect", 1.0), flip=opts.flag("flip", True),
        blur=opts.integer("blur", 0, minimum=0), mosaic=opts.flag("mosaic", False),
        cutmix=opts.flag("cutmix", False), mixup=opts.flag("mixup", False),
        label_smooth_eps=opts.number("label_smooth_eps", 0.0),
        ema_alpha=opts.number("ema_alpha", 0.0),
        options={key: opts.text(key) for key in sorted(_NET_OTHER_KEYS) if opts.has(key)},
    )
    opts.finish()
    return net


def _parse_convolutional(opts: _Options) -> ConvolutionalSection:
    opts.reject("share_index", "bin_output", "flipped", "cbn", "sway", "rotate", "stretch",
                "stretch_sway", "assisted_excitation", "coordconv", "dontload", "dontloadscales")
    stride = _square_stride(opts)
    for key, value in (("dilation", 1), ("antialiasing", 0), ("binary", 0), ("xnor", 0)):
        opts.only(key, value)
    size = opts.integer("size", 1, minimum=1)
    padding = opts.integer("padding", 0, minimum=0)
    if opts.flag("pad", False):
        padding = size // 2
    section = ConvolutionalSection(
        source=opts.source,
        filters=opts.integer("filters", 1, minimum=1),
        size=size,
        stride=stride,
        padding=padding,
        groups=opts.integer("groups", 1, minimum=1),
        batch_normalize=opts.flag("batch_normalize", False),
        activation=opts.choice("activation", "logistic", ACTIVATIONS),
        training=opts.training(),
    )
    opts.finish()
    return section


def _square_stride(opts: _Options) -> int:
    """`stride`, or `stride_x` and `stride_y` (each defaults to `stride`, as in Darknet's parser),
    which must be equal: a different stride per axis is not supported."""
    stride = opts.integer("stride", 1, minimum=1)
    stride_x = opts.integer("stride_x", stride, minimum=1)
    stride_y = opts.integer("stride_y", stride, minimum=1)
    if stride_x != stride_y:
        raise opts.error(f"stride_x={stride_x} and stride_y={stride_y}: only one stride for both axes is "
                         f"supported by yolo-admm", "stride_x" if opts.has("stride_x") else "stride_y")
    return stride_x


def _parse_maxpool(opts: _Options) -> MaxpoolSection:
    opts.reject("out_channels", "maxpool_zero_nonmax")
    stride = _square_stride(opts)
    for key, value in (("maxpool_depth", 0), ("antialiasing", 0)):
        opts.only(key, value)
    size = opts.integer("size", opts.integer("stride", 1, minimum=1), minimum=1)   # Darknet: `stride`, not stride_x
    section = MaxpoolSection(source=opts.source, size=size, stride=stride,
                             padding=opts.integer("padding", size - 1, minimum=0),
                             training=opts.training())
    opts.finish()
    return section


def _absolute_layers(opts: _Options, key: str) -> tuple[int, ...]:
    """Resolve relative (negative) layer references against this section's index."""
    layers = []
    for ref in opts.integers(key, None):
        target = opts.index + ref if ref < 0 else ref
        if not 0 <= target < opts.index:
            raise opts.error(f"option '{key}': layer {ref} resolves to {target}; expected an "
                             f"earlier layer (0..{opts.index - 1})", key)
        layers.append(target)
    return tuple(layers)


def _parse_route(opts: _Options) -> RouteSection:
    opts.reject("stream", "wait_stream")
    layers = _absolute_layers(opts, "layers")
    groups = opts.integer("groups", 1, minimum=1)
    group_id = opts.integer("group_id", 0, minimum=0)
    if group_id >= groups:
        raise opts.error(f"option 'group_id': expected 0..{groups - 1} for groups={groups}, "
                         f"found {group_id}", "group_id")
    section = RouteSection(opts.source, layers, groups, group_id, opts.training())
    opts.finish()
    return section


def _parse_shortcut(opts: _Options) -> ShortcutSection:
    opts.choice("weights_type", "none", ("none",))
    opts.choice("weights_normalization", "none", ("none",))
    activation = opts.choice("activation", "linear", ACTIVATIONS)
    if activation not in SHORTCUT_ACTIVATIONS:
        raise opts.error(f"option 'activation': {activation} on a [shortcut] is not supported by yolo-admm "
                         f"(Darknet's shortcut layer outputs 0 for it); expected one of "
                         f"{', '.join(SHORTCUT_ACTIVATIONS)}", "activation")
    section = ShortcutSection(opts.source, _absolute_layers(opts, "from"), activation, opts.training())
    opts.finish()
    return section


def _parse_upsample(opts: _Options) -> UpsampleSection:
    if opts.number("scale", 1.0) != 1.0:
        raise opts.error("option 'scale': only scale=1 is supported by yolo-admm", "scale")
    section = UpsampleSection(opts.source, opts.integer("stride", 2, minimum=1), opts.training())
    opts.finish()
    return section


def _parse_dropout(opts: _Options) -> DropoutSection:
    opts.reject("dropblock", "dropblock_size_rel", "dropblock_size_abs")
    probability = opts.number("probability", 0.2, minimum=0.0)
    if probability >= 1.0:
        raise opts.error(f"option 'probability': expected a number in [0, 1), found "
                         f"{probability}", "probability")
    section = DropoutSection(opts.source, probability, opts.training())
    opts.finish()
    return section


def _yolo_loss_options(opts: _Options, classes: int) -> dict[str, object]:
    """The `[yolo]` training options with Darknet's defaults (parser.c `parse_yolo`)."""
    counters = opts.integers("counters_per_class", ()) or None
    if counters is not None and len(counters) != classes:
        raise opts.error(f"option 'counters_per_class': expected {classes} values (classes), "
                         f"found {len(counters)}", "counters_per_class")
    return {
        "iou_thresh": opts.number("iou_thresh", 1.0),
        "ignore_thresh": opts.number("ignore_thresh", 0.5),
        "truth_thresh": opts.number("truth_thresh", 1.0),
        "iou_normalizer": opts.number("iou_normalizer", 0.75),
        "cls_normalizer": opts.number("cls_normalizer", 1.0),
        "obj_normalizer": opts.number("obj_normalizer", 1.0),
        "delta_normalizer": opts.number("delta_normalizer", 1.0),
        "iou_loss": opts.choice("iou_loss", "mse", ("mse", "iou", "giou", "diou", "ciou")),
        "iou_thresh_kind": opts.choice("iou_thresh_kind", "iou", ("iou", "giou", "diou", "ciou")),
        "label_smooth_eps": opts.number("label_smooth_eps", 0.0, minimum=0.0),
        "max_delta": opts.number("max_delta", math.inf, minimum=0.0),
        "beta_nms": opts.number("beta_nms", 0.6),
        "nms_kind": opts.choice("nms_kind", "default", ("default", "greedynms", "diounms",
                                                        "cornersnms")),
        "jitter": opts.number("jitter", 0.2, minimum=0.0),
        "resize": opts.number("resize", 1.0, minimum=0.0),
        "random": opts.number("random", 0.0),
        "focal_loss": opts.flag("focal_loss", False),
        "objectness_smooth": opts.flag("objectness_smooth", False),
        "counters_per_class": counters,
        "max_boxes": opts.integer("max", 200, minimum=1),
    }


def _parse_yolo(opts: _Options) -> YoloSection:
    opts.reject("map", "embedding_layer", "track_history_size", "sim_thresh", "dets_for_track",
                "dets_for_show", "track_ciou_norm")
    opts.ignore("thresh", "nms_threshold", "show_details")    # inference settings: ours are --conf, --iou
    classes = opts.integer("classes", 20, minimum=1)
    num = opts.integer("num", 1, minimum=1)
    mask = opts.integers("mask", tuple(range(num)))
    if any(not 0 <= m < num for m in mask) or len(set(mask)) != len(mask):
        raise opts.error(f"option 'mask': expected distinct anchor indices in 0..{num - 1} "
                         f"(num={num}), found {','.join(map(str, mask))}", "mask")
    values = opts.numbers("anchors", ())
    if len(values) != 2 * num or any(v <= 0 for v in values):
        raise opts.error(f"option 'anchors': expected {2 * num} positive numbers (num={num} "
                         f"pairs of w,h), found {len(values)}", "anchors")
    section = YoloSection(
        source=opts.source, classes=classes, num=num, mask=mask,
        anchors=tuple(zip(values[0::2], values[1::2])),
        scale_x_y=opts.number("scale_x_y", 1.0, minimum=0.0),
        new_coords=opts.flag("new_coords", False),
        loss_options=_yolo_loss_options(opts, classes),
        training=opts.training(),
    )
    opts.finish()
    return section


_SECTION_PARSERS: dict[str, Callable[[_Options], LayerSection]] = {
    "convolutional": _parse_convolutional,
    "maxpool": _parse_maxpool,
    "route": _parse_route,
    "shortcut": _parse_shortcut,
    "upsample": _parse_upsample,
    "dropout": _parse_dropout,
    "yolo": _parse_yolo,
}
_SECTION_ALIASES = {"conv": "convolutional", "max": "maxpool", "network": "net"}


def parse_cfg(path: str | Path) -> DarknetCfg:
    """Parse a Darknet cfg file.

    Args:
        path: the `.cfg` file.

    Returns:
        `DarknetCfg` with the `[net]` record and one typed record per layer section.

    Raises:
        FileNotFoundError: the file does not exist.
        DarknetError: a syntax error, unknown section/option or bad value (message names the
            file, line and section).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Darknet cfg not found: {path}")
    text = _read_text(path)
    raw_sections = _read_sections(text, path)
    if not raw_sections:
        raise DarknetError(f"{path}: expected a [net] section and layers, found no sections")
    for raw in raw_sections:
        raw.name = _SECTION_ALIASES.get(raw.name, raw.name)
    first, rest = raw_sections[0], raw_sections[1:]
    if first.name != "net":
        raise DarknetError(f"{path}:{first.line} [{first.name}]: expected the first section to "
                           f"be [net]")
    net = _parse_net(_Options(first, str(path), -1))
    layers = []
    for index, raw in enumerate(rest):
        parser = _SECTION_PARSERS.get(raw.name)
        if parser is None:
            expected = ", ".join(f"[{name}]" for name in _SECTION_PARSERS)
            raise DarknetError(f"{path}:{raw.line} [{raw.name}] (layer {index}): unknown or "
                               f"unsupported section; expected one of {expected}")
        layers.append(parser(_Options(raw, str(path), index)))
    if not layers:
        raise DarknetError(f"{path}: expected layer sections after [net], found none")
    return DarknetCfg(str(path), net, tuple(layers), text)


def with_input_size(cfg: DarknetCfg, width: int, height: int) -> DarknetCfg:
    """`cfg` with the network input `width` x `height`: its `[net]` record and its text, whose
    `width=` and `height=` lines (both required) are rewritten, so that files written from it say
    the size a model was pruned, evaluated and exported at."""
    if (cfg.net.width, cfg.net.height) == (width, height):
        return cfg
    path = Path(cfg.path)
    net = _read_sections(cfg.text, path)[0]
    lines = cfg.text.splitlines()
    for key, value in (("width", width), ("height", height)):
        lines[net.options[key][1] - 1] = f"{key}={value}"
    text = "\n".join(lines) + "\n"
    resized = _parse_net(_Options(_read_sections(text, path)[0], str(path), -1))
    assert (resized.width, resized.height) == (width, height), "the rewritten [net] must read back as written"
    return replace(cfg, net=resized, text=text)


def check_rgb_input(net: NetConfig) -> None:
    """DarknetError naming the [net] channels line unless the network takes 3 channels: images are
    read as RGB for training, evaluation and prediction (a model of other input exports all the same)."""
    if net.channels != 3:
        raise DarknetError(f"{net.source.of('channels')}: channels={net.channels}; expected channels=3: training, "
                           f"evaluation and prediction read images as RGB (a model of {net.channels}-channel "
                           f"input can be exported, not run on images here)")


def first_difference(cfg: DarknetCfg, other: DarknetCfg) -> str | None:
    """Where `cfg` first sets up another model or training than `other`: its section's place
    ("path:line [section]", the line of the first setting that differs where it is written) and,
    for sections of one kind, that setting with both values ("width 320 against 160"); None where
    the two are the same. How the files are written does not count (comments, blank lines,
    spacing, the order of a section's options)."""
    sections, others = (cfg.net, *cfg.layers), (other.net, *other.layers)
    for section, counterpart in zip(sections, others):
        if _settings(section) != _settings(counterpart):
            if type(section) is not type(counterpart):
                return f"{section.source}, against [{counterpart.source.section}]"
            name = next(f.name for f in fields(section)
                        if f.name != "source" and getattr(section, f.name) != getattr(counterpart, f.name))
            mine, theirs = getattr(section, name), getattr(counterpart, name)
            return f"{section.source.of(name)}: {name} {mine!r} against {theirs!r}"
    if len(sections) > len(others):
        return str(sections[len(others)].source)
    if len(sections) < len(others):
        return f"{cfg.path}: its end, after {len(cfg.layers)} layers against {len(other.layers)}"
    return None


def _settings(section: NetConfig | LayerSection) -> tuple:
    """A section's type and parsed values, without where it was read."""
    return (type(section), *(getattr(section, f.name) for f in fields(section) if f.name != "source"))
