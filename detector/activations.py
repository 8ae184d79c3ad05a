"""Darknet's activations as torch modules, in a registry keyed by the cfg's `activation=` name.

Formulas follow AlexeyAB/darknet `src/activations.h` and `activation_kernels.cu`. A torch built-in
is used where it computes the same function; where Darknet's constants differ from the textbook
ones (selu, gelu) or torch has no such function (hard_mish), a small module below computes
Darknet's formula:

- tanh: `2 / (1 + exp(-2x)) - 1`, which is tanh(x): `nn.Tanh`.
- relu6: `min(max(x, 0), 6)`: `nn.ReLU6`. (Darknet's GPU kernel; its CPU `activate()` has no
  relu6 case and returns 0 for every input, a Darknet bug we do not copy.)
- elu: `x` for x >= 0, else `exp(x) - 1`: `nn.ELU(alpha=1)`.
- selu: `1.0507 x` for x >= 0, else `1.0507 * 1.6732 * (exp(x) - 1)`: Darknet rounds torch's
  constants (1.0507009..., 1.6732632...), so `DarknetSELU`.
- gelu: the tanh approximation with Darknet's rounded constants,
  `0.5 x (1 + tanh(0.797885 x + 0.035677 x^3))`: `DarknetGELU`.
- hard_mish: `x` for x > 0, `x^2 / 2 + x` for -2 < x <= 0, else 0: `HardMish`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SELU_SCALE = 1.0507       # activations.h selu_activate
SELU_ALPHA = 1.6732
GELU_LINEAR = 0.797885    # activations.h gelu_activate: tanh(0.797885 x + 0.035677 x^3)
GELU_CUBIC = 0.035677


class DarknetSELU(nn.Module):
    """Darknet's selu: `SELU_SCALE * elu(x, SELU_ALPHA)`, elementwise, any shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SELU_SCALE * F.elu(x, SELU_ALPHA)


class DarknetGELU(nn.Module):
    """Darknet's gelu (tanh approximation, its constants), elementwise, any shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(GELU_LINEAR * x + GELU_CUBIC * x * x * x))


class HardMish(nn.Module):
    """Darknet's hard_mish (`hard_mish_yashas`): x for x > 0, x^2 / 2 + x for -2 < x <= 0, else 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, torch.where(x > -2, x * x / 2 + x, torch.zeros_like(x)))


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "relu": nn.ReLU,
    "mish": nn.Mish,
    "swish": nn.SiLU,
    "logistic": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu6": nn.ReLU6,
    "elu": nn.ELU,
    "selu": DarknetSELU,
    "gelu": DarknetGELU,
    "hard_mish": HardMish,
}
