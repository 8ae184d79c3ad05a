"""One-shot magnitude baselines: global equals torch's global_unstructured(L1), uniform is per layer."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import pruning
from pruning import check_selection, kept_count, magnitude_prune


def mlp_and_conv() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    with torch.no_grad():
        model[3].weight.mul_(0.1)          # a layer of small weights, for global vs uniform to differ
    return model


def test_global_matches_torch_global_unstructured_l1():
    model = mlp_and_conv()
    reference = copy.deepcopy(model)
    layers = [(reference[i], "weight") for i in (0, 3, 5, 7)]
    total = sum(module.weight.numel() for module, _ in layers)      # 432 + 4608 + 2048 + 640 = 7728
    sparsity = 0.9
    assert (sparsity * total) % 1 != 0.5                              # torch rounds the pruned count
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=sparsity)
    masks = magnitude_prune(model, sparsity, scope="global")
    for index in (0, 3, 5, 7):
        name = f"{index}.weight"
        assert torch.equal(masks[name], reference[index].weight_mask.bool()), name
        assert torch.equal(model[index].weight, reference[index].weight.detach()), name
    assert masks.stats()["kept"] == kept_count(total, sparsity)


def test_uniform_prunes_each_layer_by_its_own_magnitudes():
    model = mlp_and_conv()
    original = copy.deepcopy(model)
    masks = magnitude_prune(model, 0.75, scope="uniform")
    for index in (0, 3, 5, 7):
        weight = original[index].weight.detach()
        mask = masks[f"{index}.weight"]
        assert int(mask.sum()) == kept_count(weight.numel(), 0.75)
        assert weight.abs()[mask].min() >= weight.abs()[~mask].max()
        assert torch.equal(model[index].weight.detach(), weight * mask)
    assert torch.equal(model[0].bias, original[0].bias) and torch.equal(model[1].weight, original[1].weight)


def test_global_takes_more_from_small_layers_than_uniform_and_floors_protect_them():
    model = mlp_and_conv()
    global_masks = magnitude_prune(copy.deepcopy(model), 0.95, scope="global")
    uniform_masks = magnitude_prune(copy.deepcopy(model), 0.95, scope="uniform")
    floored = magnitude_prune(copy.deepcopy(model), 0.95, scope="global", min_density={"3.*": 0.02})
    small_layer = 16 * 32 * 9
    assert int(global_masks["3.weight"].sum()) < int(uniform_masks["3.weight"].sum()) == round(0.05 * small_layer)
    assert int(floored["3.weight"].sum()) >= 93                      # ceil(0.02 * 4608)
    assert floored.stats()["kept"] == global_masks.stats()["kept"]


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\).*got 1.0"):
        magnitude_prune(mlp_and_conv(), 1.0)
    with pytest.raises(ValueError, match="unknown magnitude scope 'layerwise': expected one of global, uniform"):
        magnitude_prune(mlp_and_conv(), 0.5, scope="layerwise")
    with pytest.raises(ValueError, match="no prunable parameters in ReLU"):
        magnitude_prune(nn.ReLU(), 0.5)


def test_check_selection_warns_where_a_floor_overrides_a_layer_ratio():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 100))       # 100 and 1000 weights
    with pytest.warns(UserWarning, match=r"in 2 layer\(s\) \(0.weight, 1.weight\): there the floor wins, so 220 "
                                         r"of 1100 weights are kept, not the 11 the ratios leave \(sparsity 0.99\)"):
        check_selection(model, [0.99], global_budget=False, min_density=0.2)
    with pytest.warns(UserWarning, match=r"in 1 layer\(s\) \(0.weight\)"):
        check_selection(model, [0.99], global_budget=False, min_density=0.2, layer_sparsity={"1.*": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_selection(model, [0.5], global_budget=False, min_density=0.2)    # the ratios keep more
        check_selection(model, [0.99], global_budget=True, min_density=0.005)  # one budget: floors fit in it


def test_check_selection_refuses_layer_ratios_that_keep_no_weight_before_any_work():
    """Found by a review: per-layer ratios that round every layer to 0 kept weights passed the
    check (its one budget over all layers keeps 4), and ADMM refused them only when built."""
    model = nn.Sequential(*[nn.Linear(20, 10, bias=False) for _ in range(10)])   # 10 layers of 200
    check_selection(model, [0.998], global_budget=True)                          # 4 of 2000 kept
    with pytest.raises(ValueError, match="sparsity 0.998 keeps none of the 2000 prunable weights"):
        check_selection(model, [0.998], global_budget=False)                     # round(0.4) per layer
    with pytest.raises(ValueError, match=r"layer_sparsity \{'\*': 0.999\} \(else sparsity 0.5\) keeps none"):
        check_selection(model, [0.5], global_budget=False, layer_sparsity={"*": 0.999})
    with pytest.warns(UserWarning, match="the floor wins, so 20 of 2000 weights are kept, not the 0"):
        check_selection(model, [0.998], global_budget=False, min_density=0.01)    # floors keep 2 a layer
    with pytest.raises(ValueError, match="keeps none"):
        pruning.ADMM(model, pruning.ADMMConfig(sparsity=0.998, scope="layerwise"))  # what it anticipates
