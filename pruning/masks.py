"""Fixed pruning masks and how they bind to a model, its optimizer and an EMA copy.

A ``Masks`` holds one bool tensor per pruned parameter (True = kept), keyed by canonical name
(see ``selection.canonical_name``), so it applies equally to a bare model, a DDP-wrapped one and
an EMA copy. Masked retraining calls ``mask_grads`` before ``optimizer.step()`` and ``apply``
after it; together they keep every pruned weight, and its optimizer state, at exactly zero.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from pruning.selection import canonical_name, canonical_parameters, prunable_parameters

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # first entry in the most significant bit, as np.packbits


def pack_mask(mask: Tensor) -> Tensor:
    """Bit-pack a bool mask, 8 entries per byte, first entry in the high bit (``np.packbits`` order).

    Args:
        mask: bool Tensor[*] of n entries.
    Returns:
        uint8 Tensor[ceil(n / 8)] on the mask's device; trailing pad bits are 0.
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of ``pack_mask``: uint8 Tensor[ceil(n / 8)] -> bool Tensor[shape]."""
    numel = 1
    for size in shape:
        numel *= int(size)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed mask for shape {tuple(shape)} must be {(numel + 7) // 8} uint8 bytes,"
            f" got {packed.numel()} of {packed.dtype}"
        )
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).view(tuple(shape))


def _ema_module(ema: object) -> nn.Module:
    """The averaged model of an EMA: ``ema.module`` when present (engine.ModelEMA), else ``ema``."""
    module = getattr(ema, "module", ema)
    if not isinstance(module, nn.Module):
        raise ValueError(f"ema must be an nn.Module or have a .module, got {type(ema).__name__}")
    return module


def _multiply(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """``tensor *= factor`` in place for every (tensor, factor) pair, in one multi-tensor operation
    (each factor cast to its tensor's dtype)."""
    if pairs:
        torch._foreach_mul_([tensor for tensor, _ in pairs], [factor.to(tensor.dtype) for tensor, factor in pairs])


def _ordinary(mask: Tensor) -> Tensor:
    """``mask``, or a normal copy of it when it was made under ``torch.inference_mode`` (such a
    tensor has no version counter, which the factor cache reads, and cannot be written outside it)."""
    if not mask.is_inference():
        return mask
    with torch.inference_mode(False):
        return mask.clone()


class Masks:
    """Bool masks (True = kept) per canonical parameter name.

    ``apply`` and ``mask_grads`` multiply by the masks as 0/1 factors in the parameters' dtype,
    cached per device and dtype (one float copy of the masked weights for each) and made again when
    a mask tensor is changed in place through torch (which moves its version counter; writes
    through ``.data`` or a NumPy view do not, and go unseen). A pruned weight that is NaN or
    infinite stays so (0 * NaN is NaN).
    """

    def __init__(self, masks: Mapping[str, Tensor]):
        """Args: masks: dict name -> bool Tensor shaped like the parameter (names canonicalised)."""
        self._masks: dict[str, Tensor] = {}
        self._factors: dict[tuple[str, torch.device, torch.dtype], tuple[int, Tensor]] = {}
        self.load_state_dict(masks)

    @classmethod
    def from_model(cls, model: nn.Module, include=None, exclude=None) -> "Masks":
        """Masks of the current nonzeros of the prunable weights (e.g. a model loaded already pruned)."""
        params = prunable_parameters(model, include, exclude)
        return cls({name: param.detach() != 0 for name, param in params.items()})

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self):
        return self._masks.items()

    def to(self, device: torch.device | str) -> "Masks":
        """Move the masks in place to ``device``; returns self."""
        self._masks = {name: _ordinary(mask.to(device)) for name, mask in self._masks.items()}
        self._factors = {}
        return self

    def _factor(self, name: str, param: Tensor) -> Tensor:
        """The mask of ``name`` as 0/1 in ``param``'s dtype and device; cached until the mask tensor
        changes (its version counter, which every in-place write moves)."""
        mask = self._masks[name]
        key = (name, param.device, param.dtype)
        cached = self._factors.get(key)
        if cached is None or cached[0] != mask._version:
            cached = self._factors[key] = (mask._version, mask.to(device=param.device, dtype=param.dtype))
        return cached[1]

    def _bound(self, model: nn.Module) -> tuple[list[nn.Parameter], list[Tensor]]:
        """The masked parameters of ``model`` and their masks as 0/1 factors in the parameter's dtype
        and device; raises ValueError naming a missing or misshaped layer.

        Looked up by name on every call, so a parameter the model replaced (e.g. by
        ``load_state_dict(assign=True)``) is the one masked.
        """
        params = canonical_parameters(model)
        bound, factors = [], []
        for name, mask in self._masks.items():
            param = params.get(name)
            if param is None:
                raise ValueError(f"mask for {name!r} has no parameter of that name in {type(model).__name__}")
            if param.shape != mask.shape:
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}"
                )
            bound.append(param)
            factors.append(self._factor(name, param))
        return bound, factors

    @torch.no_grad()
    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, ema: object = None) -> None:
        """Zero pruned weights of ``model`` (and of ``ema``'s copy), and ``optimizer`` state there.

        Optimizer state: every tensor in ``optimizer.state[param]`` with the parameter's shape
        (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...).
        One multi-tensor multiply per group (``torch._foreach_mul_``), not one per tensor.
        """
        params, factors = self._bound(model)
        _multiply(list(zip(params, factors)))
        if optimizer is not None:
            _multiply([(value, factor) for param, factor in zip(params, factors)
                       for value in optimizer.state.get(param, {}).values()
                       if isinstance(value, Tensor) and value.shape == param.shape and value.is_floating_point()])
        if ema is not None:
            _multiply(list(zip(*self._bound(_ema_module(ema)))))

    @torch.no_grad()
    def mask_grads(self, model: nn.Module) -> None:
        """Zero ``.grad`` at pruned positions (call after backward, before ``optimizer.step()``)."""
        _multiply([(param.grad, factor) for param, factor in zip(*self._bound(model)) if param.grad is not None])

    def stats(self) -> dict[str, float]:
        """Totals over all masks: ``params``, ``kept``, ``sparsity`` (fraction pruned)."""
        total = sum(mask.numel() for mask in self._masks.values())
        kept = sum(int(mask.sum()) for mask in self._masks.values())
        return {"params": total, "kept": kept, "sparsity": 1.0 - kept / total if total else 0.0}

    def state_dict(self) -> dict[str, Tensor]:
        """Plain bool tensors by name (bit-pack with ``pack_mask`` for compact storage)."""
        return dict(self._masks)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the masks with ``state`` (name -> bool Tensor)."""
        if not state:
            raise ValueError("Masks needs at least one mask, got none")
        masks = {}
        for name, mask in state.items():
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                found = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"mask for {name!r} must be a bool Tensor, got {found}")
            masks[canonical_name(name)] = _ordinary(mask)
        self._masks = masks
        self._factors = {}
