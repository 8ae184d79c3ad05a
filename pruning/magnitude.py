"""One-shot magnitude pruning baselines, with the same selection and ``Masks`` as ADMM.

- ``scope="global"``: keep the k = round((1 - sparsity) * N) largest |w| over all prunable
  weights together (what ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``
  does, up to its rounding of the pruned count);
- ``scope="uniform"``: every layer keeps round((1 - sparsity) * numel) of its own largest |w|.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from pruning.masks import Masks
from pruning.projection import check_sparsity, global_topk_masks, kept_count, layerwise_topk_masks
from pruning.selection import keeps_no_weight, layer_floors, prunable_parameters

MAGNITUDE_SCOPES = ("global", "uniform")


def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_density: float | Mapping[str, float] = 0.0,
) -> Masks:
    """Zero the smallest-magnitude prunable weights of ``model`` in place and return the masks.

    Args:
        model: any module (DDP-wrapped too).
        sparsity: fraction of prunable weights removed, in [0, 1).
        scope: "global" or "uniform" (same sparsity in every layer).
        include, exclude: parameter-name patterns (see ``selection.prunable_parameters``).
        min_density: per-layer floor of kept entries (number, or pattern -> number).
    Returns:
        ``Masks`` (True = kept) by canonical parameter name.
    """
    check_sparsity(sparsity)
    if scope not in MAGNITUDE_SCOPES:
        raise ValueError(f"unknown magnitude scope {scope!r}: expected one of {', '.join(MAGNITUDE_SCOPES)}")
    named = prunable_parameters(model, include, exclude)
    floors = layer_floors(named, min_density)
    weights = [param.detach() for param in named.values()]
    if scope == "global":
        total = sum(weight.numel() for weight in weights)
        masks = global_topk_masks(weights, kept_count(total, sparsity), floors if any(floors) else None)
    else:
        masks = layerwise_topk_masks(weights, [sparsity] * len(weights), floors)
    if not any(bool(mask.any()) for mask in masks):
        raise keeps_no_weight(sum(weight.numel() for weight in weights), sparsity)
    result = Masks(dict(zip(named, masks)))
    result.apply(model)
    return result
