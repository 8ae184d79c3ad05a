"""Projections: exact k, deterministic ties, global vs layer-wise, floors, argument errors."""
from __future__ import annotations

import pytest
import torch

from pruning.projection import (
    check_sparsity,
    floor_counts,
    global_topk_masks,
    kept_count,
    layerwise_topk_masks,
)


def reference_masks(tensors, k):
    """Slow reference: stable descending sort of |x| over the concatenation (earliest tie first)."""
    flat = torch.cat([t.reshape(-1).double().abs() for t in tensors])
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return list(torch.split(keep, [t.numel() for t in tensors]))


def flat_cat(masks):
    return torch.cat([m.reshape(-1) for m in masks])


@pytest.mark.parametrize("k", [0, 1, 7, 50, 123, 299, 300])
def test_global_keeps_exactly_k_with_many_ties(k):
    generator = torch.Generator().manual_seed(k)
    # Magnitudes from {0, 1, 2, 3}: hundreds of equal values around every threshold.
    tensors = [torch.randint(-3, 4, shape, generator=generator).float() for shape in [(10, 5), (100,), (5, 5, 6)]]
    masks = global_topk_masks(tensors, k)
    assert [m.shape for m in masks] == [t.shape for t in tensors]
    assert all(m.dtype == torch.bool for m in masks)
    assert int(flat_cat(masks).sum()) == k
    assert torch.equal(flat_cat(masks), flat_cat(reference_masks(tensors, k)))


def test_ties_go_to_the_earliest_tensor_then_flat_index():
    masks = global_topk_masks([torch.ones(4), -torch.ones(2, 2)], 6)
    assert masks[0].tolist() == [True] * 4
    assert masks[1].tolist() == [[True, True], [False, False]]


def test_ranking_is_by_magnitude_not_sign():
    (mask,) = global_topk_masks([torch.tensor([-5.0, 1.0, 3.0, -0.5])], 2)
    assert mask.tolist() == [True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_global_matches_reference_for_every_float_dtype(dtype):
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(shape, generator=generator).to(dtype) for shape in [(64, 3, 3), (1000,), (17, 9)]]
    total = sum(t.numel() for t in tensors)
    k = kept_count(total, 0.8)
    assert torch.equal(flat_cat(global_topk_masks(tensors, k)), flat_cat(reference_masks(tensors, k)))


def test_global_equals_topk_on_distinct_values_large():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=generator) * scale for n, scale in [(200_000, 1.0), (50_000, 0.01), (3, 5.0)]]
    flat = torch.cat(tensors)
    k = 12_345
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[torch.topk(flat.abs(), k).indices] = True
    assert torch.equal(flat_cat(global_topk_masks(tensors, k)), expected)


def test_splitting_a_tensor_does_not_change_the_selection():
    generator = torch.Generator().manual_seed(1)
    whole = torch.randint(0, 5, (1000,), generator=generator).float()
    pieces = list(torch.split(whole, [1, 300, 250, 449]))
    assert torch.equal(flat_cat(global_topk_masks(pieces, 333)), global_topk_masks([whole], 333)[0])


def test_global_empties_a_small_weight_layer_that_layerwise_keeps():
    generator = torch.Generator().manual_seed(0)
    big = 1.0 + torch.rand(1000, generator=generator)            # |w| in [1, 2)
    small = torch.randn(1000, generator=generator) * 0.01
    global_masks = global_topk_masks([big, small], kept_count(2000, 0.5))
    layer_masks = layerwise_topk_masks([big, small], [0.5, 0.5])
    assert int(global_masks[1].sum()) == 0 and int(global_masks[0].sum()) == 1000
    assert [int(m.sum()) for m in layer_masks] == [500, 500]


def test_floors_reserve_each_layers_largest_entries():
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(1000, generator=generator)
    small = torch.randn(200, generator=generator) * 0.01
    masks = global_topk_masks([big, small], 300, floors=[0, 20])
    assert int(masks[1].sum()) == 20 and int(masks[0].sum()) == 280
    assert torch.equal(masks[1], layerwise_topk_masks([small], [0.9])[0])
    assert torch.equal(masks[0], global_topk_masks([big], 280)[0])


def test_floors_larger_than_the_budget_are_an_error():
    with pytest.raises(ValueError, match="floors keep 30 entries, more than the budget k=20"):
        global_topk_masks([torch.randn(100), torch.randn(100)], 20, floors=[15, 15])


def test_layerwise_keeps_round_of_each_ratio_and_respects_floors():
    tensors = [torch.randn(10, 10), torch.randn(7), torch.randn(3, 3)]
    masks = layerwise_topk_masks(tensors, [0.25, 0.5, 0.9], floors=[0, 0, 2])
    assert [int(m.sum()) for m in masks] == [75, 4, 2]     # round(3.5) == 4; floor lifts 1 to 2


def test_kept_count_and_floor_counts():
    assert kept_count(10, 0.8) == 2
    assert kept_count(1000, 0.0) == 1000
    assert floor_counts([10, 100, 5], [0.3, 1e-12, 0.0]) == [3, 1, 0]
    # found by a review: a 1e-9 tolerance ran out above ~40M entries, so a floor of 1 - sparsity
    # exceeded the budget it equals
    assert floor_counts([44_630_900, 7, 3], [0.55, 1 / 7, 0.7]) == [kept_count(44_630_900, 0.45), 1, 3]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", True, float("nan")])
def test_check_sparsity_names_the_bad_value(bad):
    with pytest.raises(ValueError, match=repr(bad) if not isinstance(bad, float) else str(bad)):
        check_sparsity(bad)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"k must be in \[0, 10\].*got 11"):
        global_topk_masks([torch.randn(10)], 11)
    with pytest.raises(ValueError, match="no tensors"):
        global_topk_masks([], 0)
    with pytest.raises(ValueError, match="floating tensor, got dtype torch.int64"):
        global_topk_masks([torch.arange(5)], 2)
    with pytest.raises(ValueError, match="2 tensors but 1 ratios"):
        layerwise_topk_masks([torch.randn(3), torch.randn(3)], [0.5])
    with pytest.raises(ValueError, match=r"sparsity of tensor 1 must be in \[0, 1\).*got 1.0"):
        layerwise_topk_masks([torch.randn(3), torch.randn(3)], [0.5, 1.0])
