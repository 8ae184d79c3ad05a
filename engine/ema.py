"""Exponential moving average of model weights (the timm / Ultralytics `ModelEMA` recipe).

The decay ramps up with the number of updates, d(n) = decay * (1 - exp(-n / tau)), so the
average follows the model closely early in training and smooths strongly later. Floating-point
parameters are averaged; buffers (BatchNorm running statistics, counters) are copied from the
model on every update.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """A frozen copy of `model` whose parameters track an exponential moving average.

    Args:
        model: the model being trained (an `nn.Module`, possibly wrapped by DDP: `.module` is used).
        decay: the asymptotic decay, e.g. 0.9999.
        tau: ramp length in updates; `tau <= 0` disables the ramp (constant `decay`).
        updates: number of updates already done (for resuming).

    Attributes:
        module: the averaged copy, in eval mode, with `requires_grad=False`.
        updates: how many times `update` ran.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), found {decay}")
        self.module = copy.deepcopy(unwrap(model)).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = updates

    def current_decay(self) -> float:
        """The decay the next `update` would use, d(updates + 1)."""
        if self.tau <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend `model`'s parameters into the average and copy its buffers."""
        decay = self.current_decay()
        self.updates += 1
        source = unwrap(model)
        pairs = list(zip(self.module.parameters(), source.parameters()))
        averaged = [(ema, param.detach().to(ema.dtype)) for ema, param in pairs if ema.dtype.is_floating_point]
        if averaged:
            torch._foreach_lerp_([ema for ema, _ in averaged], [param for _, param in averaged], 1.0 - decay)
        copied = [(ema, param.detach()) for ema, param in pairs if not ema.dtype.is_floating_point]
        copied += list(zip(self.module.buffers(), source.buffers()))
        if copied:
            torch._foreach_copy_([ema for ema, _ in copied], [value for _, value in copied])

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the schedule position, for checkpoints."""
        return {"module": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
        self.tau = float(state["tau"])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel / DataParallel wrapper (or `model` itself)."""
    wrapped = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrapped) else model
