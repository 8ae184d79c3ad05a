"""`DarknetModel`: a Darknet cfg as a PyTorch module, and `load_darknet` to build and load one."""
from __future__ import annotations

import math
import copy
from pathlib import Path

import torch
from torch import nn

from detector.cfg import DarknetCfg, DarknetError, NetConfig, parse_cfg
from detector.head import YoloHead
from detector.layers import ConvBlock, build_layers
from detector.weights import WeightsHeader, read_weights


class DarknetModel(nn.Module):
    """The layers of a Darknet cfg, run in cfg order; route and shortcut read earlier outputs.

    Attributes:
        cfg: the parsed `detector.cfg.DarknetCfg`.
        net: its `[net]` section (`NetConfig`): input size, letter_box, training options.
        layers: `nn.ModuleList`, one module per cfg layer section (index = Darknet layer index).
        heads: list[YoloHead], the `[yolo]` layers in cfg order.
        input_multiple: the input height and width must be multiples of this (the deepest
            downsampling of the network, 32 for the YOLO cfgs), or the cfg's own size (which a
            network of unpadded convolutions, 64 -> 31 -> 15 -> 7, need not be a multiple of).
        weights_header: the header of the `.weights` file loaded by `load_darknet`, else None.
        class_names: the class names, where known (a compact archive's, or set by the caller);
            the exports write them. None otherwise.

    Forward: `x` float Tensor[B, channels, H, W], RGB in [0, 1]. Returns one Tensor[B, A, Hk, Wk,
    5 + C] per head, in cfg order: decoded in eval mode (cx, cy, w, h in input pixels, objectness,
    class probabilities), the per-anchor input of the head in training mode (`detector.decode`
    turns it into the eval output).
    """

    def __init__(self, cfg: DarknetCfg):
        super().__init__()
        modules, shapes = build_layers(cfg)
        self.cfg = cfg
        self.net: NetConfig = cfg.net
        self.layers = nn.ModuleList(modules)
        self.heads: list[YoloHead] = [m for m in modules if isinstance(m, YoloHead)]
        if not self.heads:
            raise DarknetError(f"{cfg.path}: expected at least one [yolo] layer, found none")
        self.input_multiple = max(max(cfg.net.width // s.width, cfg.net.height // s.height)
                                  for s in shapes)
        self.weights_header: WeightsHeader | None = None
        self.class_names: list[str] | None = None      # exported with the model where known (`detector.export`)
        self._head_indices = [i for i, m in enumerate(modules) if isinstance(m, YoloHead)]
        self._release_after = _release_schedule(modules, set(self._head_indices))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_tracing():
            self._check_input(x)
        values: list[torch.Tensor | None] = [x] + [None] * len(self.layers)   # [0] = input
        for index, layer in enumerate(self.layers):
            values[index + 1] = layer(*[values[source + 1] for source in layer.sources])
            for done in self._release_after[index]:
                values[done + 1] = None
        outputs = [values[index + 1] for index in self._head_indices]
        if not torch.jit.is_tracing():
            self._check_grids(x, outputs)
        return outputs

    def _check_grids(self, x: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        """ValueError when a head's grid times its stride misses the input size: a cfg whose size the
        downsampling does not divide exactly (width=100 with five stride-2 layers) decodes boxes with
        the cfg's stride, which is right at the cfg's own size only."""
        for index, head, output in zip(self._head_indices, self.heads, outputs):
            grid_h, grid_w = output.shape[2], output.shape[3]
            tiles = (math.isclose(grid_h * head.stride, x.shape[2], rel_tol=1e-9)      # a stride of 31 / 15
                     and math.isclose(grid_w * head.stride, x.shape[3], rel_tol=1e-9))  # is not exact in floats
            if not tiles:
                raise ValueError(
                    f"{self.cfg.path}: at input {x.shape[2]}x{x.shape[3]} layer {index} ([yolo]) has a "
                    f"{grid_h}x{grid_w} grid, which does not tile the input with its stride {head.stride:g} (fixed "
                    f"at the cfg's {self.net.height}x{self.net.width}); use the cfg's size, or a cfg size that "
                    f"every downsampling divides exactly (multiples of 32 for the YOLO cfgs)")

    def accepts_size(self, height: int, width: int) -> bool:
        """Whether an input of `height` x `width` suits the network: the cfg's own size, or, where
        the downsampling divides the cfg's size exactly, positive multiples of `input_multiple`.
        (A network of unpadded convolutions, 64 -> 31 -> 15 -> 7, runs at its cfg's size only.)"""
        if (height, width) == (self.net.height, self.net.width):
            return True
        multiple = self.input_multiple
        exact = not self.net.height % multiple and not self.net.width % multiple
        return exact and height > 0 and width > 0 and not height % multiple and not width % multiple

    def _check_input(self, x: torch.Tensor) -> None:
        channels = self.net.channels
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{self.cfg.path}: expected input Tensor[B, {channels}, H, W], "
                             f"found shape {tuple(x.shape)}")
        if not self.accepts_size(x.shape[2], x.shape[3]):
            raise ValueError(f"{self.cfg.path}: expected input height and width that are "
                             f"{self.size_rule()}, found {x.shape[2]}x{x.shape[3]}")

    def size_rule(self) -> str:
        """The input sizes `accepts_size` takes, in words."""
        own = f"the cfg's {self.net.height}x{self.net.width}"
        if self.net.height % self.input_multiple or self.net.width % self.input_multiple:
            return f"{own} (its downsampling divides no other size evenly)"
        return f"multiples of {self.input_multiple} (or {own})"


def _release_schedule(modules: list[nn.Module], keep: set[int]) -> list[tuple[int, ...]]:
    """For each layer i, the outputs (layer index, -1 = input) no longer needed after layer i."""
    last_use = {index: index for index in range(len(modules))}
    last_use[-1] = 0
    for index, module in enumerate(modules):
        for source in module.sources:
            last_use[source] = max(last_use[source], index)
    schedule: list[list[int]] = [[] for _ in modules]
    for value, index in last_use.items():
        if value not in keep:
            schedule[index].append(value)
    return [tuple(sorted(done)) for done in schedule]


def fused_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every batch norm folded into its conv.

    Same outputs up to float rounding, fewer passes over memory: for inference and benchmarks.
    The copy cannot be trained nor written as `.weights` (its layout no longer matches the cfg).
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBlock):
            module.fuse_batchnorm()
    return fused


def load_darknet(cfg_path: str | Path, weights_path: str | Path | None = None, partial: bool = False) -> DarknetModel:
    """Build the model of a Darknet cfg and load its `.weights`, if given.

    Args:
        cfg_path: the `.cfg` file.
        weights_path: the `.weights` file; None keeps PyTorch's default initialisation.
        partial: accept weights for the first layers only (`read_weights`), to train from.

    Returns:
        A `DarknetModel` on the CPU in eval mode, float32.

    Raises:
        FileNotFoundError: a file is missing.
        DarknetError (a ValueError): a bad cfg or weights file; the message names the file and
            the line or layer.
    """
    model = DarknetModel(parse_cfg(cfg_path))
    if weights_path is not None:
        model.weights_header = read_weights(weights_path, model, partial)
    return model.eval()
