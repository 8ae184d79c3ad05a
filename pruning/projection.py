"""Projections onto sparsity sets: keep the k largest magnitudes, globally or per layer.

Pure functions on lists of tensors; nothing here knows about models.

Ranking is exact and deterministic. Magnitudes are compared through integer keys (the IEEE bit
pattern with the sign bit cleared, which orders like ``|x|``), the k-th largest key is found by a
radix select (one ``torch.bincount`` over the top 15 magnitude bits of every key, then an exact
``torch.kthvalue`` over the few keys in the boundary bucket), and ties at the threshold are kept
in order of (tensor index, flat index): the earliest win.

Every pass is vectorised over one tensor at a time: the tensors are the chunks, so no flat copy
of all weights is made and temporaries stay layer-sized (on CPU, allocator-recycled memory
rather than fresh pages: one fresh 256 MB buffer per op made a flat variant twice as slow).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

_KEY_DTYPES = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_BUCKET_BITS = 15  # bincount over the top 15 magnitude bits: 32768 buckets


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return ``sparsity`` as a float if it lies in [0, 1), else raise ValueError naming it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (fraction of weights removed), got {sparsity!r}")
    return float(sparsity)


def kept_count(numel: int, sparsity: float) -> int:
    """Number of entries kept at ``sparsity``: ``round((1 - sparsity) * numel)`` (Python rounding)."""
    return round((1.0 - check_sparsity(sparsity)) * numel)


def floor_counts(numels: Sequence[int], min_densities: Sequence[float]) -> list[int]:
    """Minimum kept entries per tensor: ``ceil(density * numel)``, and at least 1 when density > 0.

    The product is exact, with the density as its shortest decimal (``0.3 * 10`` keeps 3, not 4, and
    ``0.55 * 44630900`` keeps 24546995 at any size, where a fixed float tolerance runs out).
    """
    if len(numels) != len(min_densities):
        raise ValueError(f"floor_counts: {len(numels)} tensors but {len(min_densities)} min densities")
    floors = []
    for numel, density in zip(numels, min_densities):
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"min_density must be in [0, 1], got {density!r}")
        floor = math.ceil(Fraction(repr(float(density))) * numel)
        floors.append(min(numel, max(floor, 1) if density > 0 else 0))
    return floors


def magnitude_keys(tensor: Tensor) -> Tensor:
    """Integer keys that order like ``|tensor|``.

    Args:
        tensor: float16, bfloat16, float32 or float64 Tensor[*].
    Returns:
        int16/int32/int64 Tensor[numel] (flat), the bit pattern with the sign bit cleared.
        NaN ranks above +inf.
    """
    key_dtype = _KEY_DTYPES.get(tensor.dtype)
    if key_dtype is None:
        raise ValueError(f"magnitude ranking needs a floating tensor, got dtype {tensor.dtype}")
    sign_clear = torch.iinfo(key_dtype).max
    return tensor.detach().reshape(-1).view(key_dtype) & sign_clear


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _select_top_keys(keys: Sequence[Tensor], k: int) -> list[Tensor]:
    """Masks of exactly ``k`` largest entries over flat int Tensors ``keys``, ties to the earliest."""
    total = sum(key.numel() for key in keys)
    if k == 0 or k == total:
        return [torch.full_like(key, k == total, dtype=torch.bool) for key in keys]
    shift = torch.iinfo(keys[0].dtype).bits - 1 - _BUCKET_BITS
    counts = sum(torch.bincount(key >> shift, minlength=1 << _BUCKET_BITS) for key in keys)
    from_top = counts.flip(0).cumsum(0)                       # [32768] entries in buckets >= b
    top_index = int(torch.searchsorted(from_top, k))          # first bucket reaching k entries
    bucket = (1 << _BUCKET_BITS) - 1 - top_index
    above = int(from_top[top_index]) - int(counts[bucket])    # entries in strictly higher buckets
    positions = [torch.nonzero((key >> shift) == bucket).flatten() for key in keys]   # boundary bucket
    candidates = [key[where] for key, where in zip(keys, positions)]
    pooled = torch.cat(candidates)                            # [M], M << N
    needed = k - above
    threshold = torch.kthvalue(pooled, pooled.numel() - needed + 1).values
    ties_left = needed - int((pooled > threshold).sum())
    masks = []
    for key, where, candidate in zip(keys, positions, candidates):
        mask = key > threshold
        if ties_left > 0:
            ties = where[candidate == threshold][:ties_left]
            mask[ties] = True
            ties_left -= ties.numel()
        masks.append(mask)
    return masks


def check_one_device(tensors: Sequence[Tensor], what: str) -> None:
    """ValueError naming the devices when ``tensors`` are not all on one device (a model split
    across devices): a global ranking compares them all, so they must be together."""
    devices = sorted({str(tensor.device) for tensor in tensors})
    if len(devices) > 1:
        raise ValueError(f"{what} must all be on one device, found them on {', '.join(devices)} "
                         f"(a model split across devices cannot be pruned globally; move it whole with .to())")


def global_topk_masks(tensors: Sequence[Tensor], k: int, floors: Sequence[int] | None = None) -> list[Tensor]:
    """Keep exactly ``k`` entries of largest magnitude over all tensors together.

    Args:
        tensors: list of L float Tensors of any shapes (e.g. W + U per layer).
        k: number of entries to keep in total, 0 <= k <= N (N = sum of numels).
        floors: optional list of L ints, the minimum entries kept in each tensor (its largest
            ones); the rest of the budget goes to the largest remaining entries anywhere.
    Returns:
        list of L bool Tensors shaped like ``tensors``, with exactly ``k`` True in total.
        Ties at the threshold go to the earliest (tensor index, then flat index).
    """
    if len(tensors) == 0:
        raise ValueError("global_topk_masks: no tensors given")
    total = sum(tensor.numel() for tensor in tensors)
    if not 0 <= k <= total:
        raise ValueError(f"global_topk_masks: k must be in [0, {total}] (total entries), got {k}")
    check_one_device(tensors, "global_topk_masks: the tensors")
    dtype = _common_dtype(tensors)
    keys = [magnitude_keys(tensor.to(dtype)) for tensor in tensors]
    if floors is not None:
        _reserve_floors(keys, floors, k)
    masks = _select_top_keys(keys, k)
    return [mask.view(tensor.shape) for mask, tensor in zip(masks, tensors)]


def _reserve_floors(keys: Sequence[Tensor], floors: Sequence[int], k: int) -> None:
    """Set each tensor's ``floors[i]`` largest keys (in place) to the maximum key, so a global pick takes them first."""
    if len(floors) != len(keys):
        raise ValueError(f"floors: {len(keys)} tensors but {len(floors)} floors")
    if sum(floors) > k:
        raise ValueError(f"per-layer floors keep {sum(floors)} entries, more than the budget k={k}")
    for index, (key, floor) in enumerate(zip(keys, floors)):
        if not 0 <= floor <= key.numel():
            raise ValueError(f"floor of tensor {index} must be in [0, {key.numel()}], got {floor}")
        if floor > 0:
            (reserved,) = _select_top_keys([key], floor)
            key.masked_fill_(reserved, torch.iinfo(key.dtype).max)


def layerwise_topk_masks(
    tensors: Sequence[Tensor], ratios: Sequence[float], floors: Sequence[int] | None = None
) -> list[Tensor]:
    """Keep the largest-magnitude entries of each tensor separately.

    Args:
        tensors: list of L float Tensors of any shapes.
        ratios: list of L sparsities in [0, 1): tensor i keeps ``round((1 - ratios[i]) * numel_i)``.
        floors: optional list of L ints, minimum entries kept per tensor (raises the count).
    Returns:
        list of L bool Tensors shaped like ``tensors``; ties go to the lowest flat index.
    """
    if len(ratios) != len(tensors):
        raise ValueError(f"layerwise_topk_masks: {len(tensors)} tensors but {len(ratios)} ratios")
    floors = [0] * len(tensors) if floors is None else list(floors)
    if len(floors) != len(tensors):
        raise ValueError(f"layerwise_topk_masks: {len(tensors)} tensors but {len(floors)} floors")
    masks = []
    for index, (tensor, ratio, floor) in enumerate(zip(tensors, ratios, floors)):
        keep = max(kept_count(tensor.numel(), check_sparsity(ratio, f"sparsity of tensor {index}")), floor)
        (mask,) = _select_top_keys([magnitude_keys(tensor)], min(keep, tensor.numel()))
        masks.append(mask.view(tensor.shape))
    return masks
