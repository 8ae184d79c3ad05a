"""ADMM: config validation, selection, W-step gradient, Z/U-step, convergence, resume, callback."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pruning import (
    ADMM,
    ADMMCallback,
    ADMMConfig,
    RHO_LIMIT,
    global_topk_masks,
    kept_count,
    prunable_parameters,
)

from helpers import small_convnet


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that depends only on the step index (so a resumed run sees the same data)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator)


def train_steps(trainer, callback, first_step: int, count: int) -> None:
    """A minimal loop calling the engine's hooks in the engine's order."""
    for step in range(first_step, first_step + count):
        images, labels = batch(step)
        trainer.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(trainer.model(images), labels).backward()
        callback.before_step(trainer)
        trainer.optimizer.step()
        callback.after_step(trainer)


# ---- configuration and selection -------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.2])
def test_config_rejects_sparsity_outside_unit_interval_naming_it(sparsity):
    with pytest.raises(ValueError, match=rf"sparsity must be in \[0, 1\).*got {sparsity}"):
        ADMMConfig(sparsity=sparsity)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scope": "per-layer"}, "unknown ADMM scope 'per-layer': expected one of global, layerwise"),
        ({"layer_sparsity": {"0.weight": 0.5}}, "layer_sparsity needs scope='layerwise'"),
        ({"scope": "layerwise", "layer_sparsity": {"0.weight": 1.0}}, r"layer_sparsity\['0.weight'\]"),
        ({"rho": 0.0}, r"rho must be a number in \(0, 3.403e\+38\] \(it multiplies float32 weights\), got 0.0"),
        ({"rho": 1e39}, r"rho must be a number in \(0, 3.403e\+38\]"),      # found by a review: a traceback
        ({"rho_multiplier": 0.5}, "rho_multiplier must be a finite number >= 1, got 0.5"),
        ({"rho_multiplier": math.inf}, "rho_multiplier must be a finite number >= 1, got inf"),
        ({"rho": 1.0, "rho_max": 0.5}, r"rho_max must be in \[rho \(1.0\), 3.403e\+38\], got 0.5"),
        ({"min_density": 2.0}, r"min_density must be in \[0, 1\], got 2.0"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ADMMConfig(sparsity=0.5, **kwargs)


def test_no_prunable_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="no prunable parameters in Sequential"):
        ADMM(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()), ADMMConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="no prunable parameters"):
        ADMM(small_convnet(), ADMMConfig(sparsity=0.5, exclude=["*"]))
    with pytest.raises(ValueError, match="include pattern 'backbone.*' matches no Conv/Linear weight"):
        ADMM(small_convnet(), ADMMConfig(sparsity=0.5, include=["backbone.*"]))
    with pytest.raises(ValueError, match=r"exclude pattern 'head\.\*' matches no Conv/Linear weight"):
        ADMM(small_convnet(), ADMMConfig(sparsity=0.5, exclude=["7.*", "head.*"]))   # a typo would prune the head


def test_selection_takes_conv_and_linear_weights_only_with_patterns():
    model = small_convnet()
    assert list(prunable_parameters(model)) == ["0.weight", "3.weight", "7.weight"]
    assert list(prunable_parameters(model, exclude="7.*")) == ["0.weight", "3.weight"]
    assert list(prunable_parameters(model, include=[r"re:^[37]\."])) == ["3.weight", "7.weight"]
    wrapped = nn.Module()
    wrapped.module = model                              # how DDP/DataParallel name parameters
    assert list(prunable_parameters(wrapped)) == ["0.weight", "3.weight", "7.weight"]
    assert prunable_parameters(wrapped)["3.weight"] is model[3].weight
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    tied[1].weight = tied[0].weight                     # counted once, under its first name
    assert list(prunable_parameters(tied)) == ["0.weight", "2.weight"]


def test_weights_on_several_devices_are_refused_by_name():
    """A model split across devices cannot be ranked globally (here: CPU and "meta", where a second
    GPU would be): a clear error before any work, not a device mismatch deep in the projection."""
    split = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3, device="meta"))
    with pytest.raises(ValueError, match="ADMM: the prunable weights must all be on one device, found them on cpu, meta"):
        ADMM(split, ADMMConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="the tensors must all be on one device, found them on cpu, meta"):
        global_topk_masks([split[0].weight, split[1].weight], 9)


def test_a_linear_weight_tied_to_an_embedding_is_pruned_under_its_parameter_name():
    """Weight tying as in language models: the output Linear shares the Embedding's weight, which
    named_parameters (and so masks, optimizers and state dicts) lists as "embed.weight"."""
    from pruning import magnitude_prune

    model = nn.Module()
    model.embed, model.hidden, model.out = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
    model.out.weight = model.embed.weight
    assert list(prunable_parameters(model)) == ["hidden.weight", "embed.weight"]
    masks = magnitude_prune(model, 0.5)
    masks.apply(model)
    assert sum(int(torch.count_nonzero(p)) for p in (model.hidden.weight, model.embed.weight)) == kept_count(56, 0.5)


def test_frozen_weights_are_refused_by_name_until_excluded():
    """Found by a review: a frozen weight got the penalty as its gradient, trained, and was cut."""
    model = small_convnet()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"ADMM trains the weights it prunes, but 1 are frozen \(requires_grad=False\): "
                                         r"0.weight; exclude them"):
        ADMM(model, ADMMConfig(sparsity=0.5))
    assert ADMM(model, ADMMConfig(sparsity=0.5, exclude=["0.*"])).names == ["3.weight", "7.weight"]


def test_floors_above_the_final_budget_are_refused_at_construction_with_a_ramp_too():
    """Found by a review: with a ramp only the first target was checked, so the error came at an
    update, an epoch or more into training."""
    for ramp in ({}, {"ramp_from": 0.5, "ramp_updates": 3}):
        with pytest.raises(ValueError, match="min_density keeps 286 weights at least, more than the 95 of 952 that "
                                             "sparsity 0.9 leaves"):
            ADMM(small_convnet(), ADMMConfig(sparsity=0.9, min_density=0.3, **ramp))


def test_two_parameters_with_one_canonical_name_are_a_clear_error():
    model = nn.Module()
    model.module, model.fc = nn.Sequential(nn.Linear(3, 3)), nn.Linear(3, 3)
    model.add_module("0", nn.Linear(3, 3))                # "module.0.weight" and "0.weight"
    with pytest.raises(ValueError, match=r"parameters 'module.0.weight' and '0.weight' are both '0.weight'"):
        prunable_parameters(model)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_a_sparsity_that_keeps_no_weight_is_refused(scope):
    """Found by a review: --sparsity 0.9999999 removed every weight and reported it as a result."""
    from pruning import magnitude_prune

    with pytest.raises(ValueError, match="sparsity 0.9999 keeps none of the 952 prunable weights"):
        ADMM(small_convnet(), ADMMConfig(sparsity=0.9999, scope=scope))
    model = small_convnet()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="sparsity 0.9999 keeps none of the 952 prunable weights"):
        magnitude_prune(model, 0.9999, scope="global" if scope == "global" else "uniform")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))      # nothing pruned
    ADMM(small_convnet(), ADMMConfig(sparsity=0.999, scope=scope))                   # keeps one
    if scope == "layerwise":
        with pytest.raises(ValueError, match=r"layer_sparsity \{'\*': 0.9999\} \(else sparsity 0.5\) keeps none"):
            ADMM(small_convnet(), ADMMConfig(sparsity=0.5, scope=scope, layer_sparsity={"*": 0.9999}))


def test_numpy_numbers_are_numbers(tmp_path):
    """Found by a review: numpy numbers were kept as given, so they reached the state dict, which
    `torch.load(weights_only=True)` (an Ultralytics resume) refused, and `update()`'s JSON stats."""
    config = ADMMConfig(sparsity=np.float32(0.5), ramp_from=np.float64(0.25), ramp_updates=2, rho=np.float32(0.1),
                        rho_multiplier=np.float64(2), rho_max=np.float32(1), min_density=np.float32(0.01))
    assert config.sparsity == 0.5 and config.rho == pytest.approx(0.1)
    numbers = (config.sparsity, config.ramp_from, config.rho, config.rho_multiplier, config.rho_max, config.min_density)
    assert all(type(value) is float for value in numbers)
    layerwise = ADMMConfig(sparsity=0.5, scope="layerwise", layer_sparsity={"0.*": np.float32(0.25)},
                           min_density={"0.*": np.float64(0.1)})
    assert type(layerwise.layer_sparsity["0.*"]) is float and type(layerwise.min_density["0.*"]) is float
    admm = ADMM(small_convnet(), config)
    json.dumps(admm.update())
    torch.save(admm.state_dict(), tmp_path / "admm.pt")
    ADMM(small_convnet(), config).load_state_dict(torch.load(tmp_path / "admm.pt", weights_only=True))


# ---- W-step ----------------------------------------------------------------------------------

def test_add_penalty_grad_equals_autograd_of_the_augmented_term():
    torch.manual_seed(0)
    model = small_convnet().double()
    admm = ADMM(model, ADMMConfig(sparsity=0.6, rho=0.3))
    with torch.no_grad():                               # move W, then one update makes U nonzero
        for param in admm.params:
            param.add_(torch.randn_like(param) * 0.1)
    admm.update()
    images, labels = batch(0)
    loss = nn.functional.cross_entropy(model(images.double()), labels)
    penalty = sum((w - z + u).pow(2).sum() for w, z, u in zip(admm.params, admm.Z, admm.U)) * admm.rho / 2
    expected = torch.autograd.grad(loss + penalty, admm.params, retain_graph=True)
    model.zero_grad(set_to_none=True)
    loss.backward()
    admm.add_penalty_grad()
    for param, grad in zip(admm.params, expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-12, atol=1e-12)


def test_add_penalty_grad_creates_missing_grads():
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.5, rho=2.0))
    admm.add_penalty_grad()
    for param, z, u in zip(admm.params, admm.Z, admm.U):
        torch.testing.assert_close(param.grad, 2.0 * (param.detach() - z + u))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_keep_a_small_loss_gradient_where_the_penalty_cancels(dtype):
    """Found by a review: grad + rho W, then + rho (U - Z), rounded in 16 bits a loss gradient below
    rho |W| 2^-8 away at kept weights, where the two terms cancel (0.4% of them wrong by over 50% at
    rho 0.1 in bfloat16). The penalty is formed first: at a fresh ADMM it is exactly 0 there."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(dtype)
    admm = ADMM(model, ADMMConfig(sparsity=0.5, rho=1.0, include=["weight"]))
    loss_grad = (1e-3 * torch.randn(64, 64)).to(dtype)
    model.weight.grad = loss_grad.clone()
    admm.add_penalty_grad()
    kept = admm.support[0]
    assert torch.equal(model.weight.grad[kept], loss_grad[kept])
    pruned = (loss_grad.double() + model.weight.detach().double())[~kept]       # rho (W - 0) where Z is 0
    torch.testing.assert_close(model.weight.grad[~kept].double(), pruned, rtol=1e-2, atol=1e-3)


def test_an_admm_built_under_inference_mode_trains_and_updates_outside_it():
    """Found by a review: its Z, U and support were inference tensors, which update() could not write."""
    model = small_convnet()
    with torch.inference_mode():
        admm = ADMM(model, ADMMConfig(sparsity=0.5, exclude="7.weight"))      # one pattern as a plain string
    assert admm.config.exclude == ["7.weight"] and admm.names == ["0.weight", "3.weight"]
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    admm.add_penalty_grad()
    assert admm.update()["iteration"] == 1


def test_state_follows_the_weights_when_the_model_is_converted_after_the_admm_was_built():
    """`model.double()` (like `model.to("cuda")`, see tests/test_cuda.py) keeps the Parameter objects:
    the ADMM state must follow them, and the penalty stay rho (W - Z + U)."""
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.5, rho=2.0))
    admm.update()
    z_before, u_before = [z.clone() for z in admm.Z], [u.clone() for u in admm.U]
    model.double()
    admm.add_penalty_grad()
    for param, z, u, support in zip(admm.params, z_before, u_before, admm.support):
        assert param.dtype == torch.float64 and param.grad.dtype == torch.float64
        torch.testing.assert_close(param.grad, 2.0 * (param.detach() - z.double() + u.double()))
        assert support.dtype == torch.bool
    assert all(state.dtype == torch.float64 for state in (*admm.Z, *admm.U))
    assert sum(int(mask.sum()) for _, mask in admm.hard_prune().items()) == admm.k


# ---- Z-step, U-step, rho -----------------------------------------------------------------------

def test_weights_replaced_after_the_admm_was_built_take_over_its_state():
    """Found by a review: after load_state_dict(assign=True) the ADMM went on with the old
    Parameters, so the penalty reached no weight and the hard prune cut none of the model's."""
    torch.manual_seed(0)
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.75, rho=1.0))
    model.load_state_dict({name: tensor.clone() for name, tensor in model.state_dict().items()}, assign=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[3].weight.detach().clone()
    admm.add_penalty_grad()                                   # no loss: the step is the penalty alone
    optimizer.step()
    assert not torch.equal(model[3].weight, before)
    admm.update()
    admm.hard_prune()
    assert sum(int(torch.count_nonzero(model[i].weight)) for i in (0, 3, 7)) == admm.k
    model[0].weight.requires_grad_(False)                      # frozen in place, not replaced: the update goes on,
    admm.update()
    with pytest.raises(ValueError, match=r"ADMM: 0.weight is frozen now \(requires_grad=False\)"):
        admm.add_penalty_grad()                                # but a gradient made for it would still move it
    model[0].weight.requires_grad_(True)
    model[3] = nn.Conv2d(8, 8, 3, padding=1)                   # a new layer of the same shape: followed by name,
    admm.add_penalty_grad()                                    # from the next step on, not the next update
    assert admm.params[1] is model[3].weight and model[3].weight.grad is not None
    model[3] = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    with pytest.raises(ValueError, match=r"ADMM: 3.weight was replaced by a frozen weight \(requires_grad=False\)"):
        admm.add_penalty_grad()
    model[3] = nn.Conv2d(8, 8, 1)
    with pytest.raises(ValueError, match=r"ADMM: 3.weight has shape \(8, 8, 1, 1\) now, its ADMM state \(8, 8, 3, 3\)"):
        admm.update()


def test_an_update_whose_projection_fails_leaves_rho_as_it_was(monkeypatch):
    admm = ADMM(small_convnet(), ADMMConfig(sparsity=0.5, rho=1.0, rho_multiplier=2.0))
    monkeypatch.setattr(admm, "project", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError):
        admm.update()
    assert (admm.rho, admm.iteration) == (1.0, 0)


def test_an_uncapped_rho_stops_growing_where_float32_ends():
    """Found by a review: --rho-mult 1e300 overflowed float32 at the second update (a traceback)."""
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.5, rho=1e30, rho_multiplier=1e300))
    admm.update()
    assert admm.rho == RHO_LIMIT
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    admm.add_penalty_grad()                  # multiplies float32 gradients by rho: no overflow error
    admm.update()
    assert admm.rho == RHO_LIMIT


def test_update_is_projection_then_dual_step_with_rescaled_u():
    torch.manual_seed(0)
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.7, rho=1.0, rho_multiplier=2.0, rho_max=3.0))
    assert math.isclose(sum(int(m.sum()) for m in admm.support), kept_count(sum(p.numel() for p in admm.params), 0.7))
    with torch.no_grad():
        for param in admm.params:
            param.add_(torch.randn_like(param))
    weights = [p.detach().clone() for p in admm.params]
    z_prev, u_prev = [z.clone() for z in admm.Z], [u.clone() for u in admm.U]
    stats = admm.update()
    targets = [w + u for w, u in zip(weights, u_prev)]
    support = global_topk_masks(targets, admm.k)
    z_new = [t * m for t, m in zip(targets, support)]
    for got, want in zip(admm.Z, z_new):
        assert torch.equal(got, want)
    for got, w, z in zip(admm.U, weights, z_new):            # rho 1 -> 2: U scaled by 1/2
        torch.testing.assert_close(got, (w - z) * 0.5)
    primal = math.sqrt(sum(float((w - z).pow(2).sum()) for w, z in zip(weights, z_new)))
    dual = 1.0 * math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(z_new, z_prev)))
    assert stats["iteration"] == 1 and stats["rho"] == 1.0 and stats["next_rho"] == 2.0
    assert math.isclose(stats["primal_residual"], primal, rel_tol=1e-5)
    assert math.isclose(stats["dual_residual"], dual, rel_tol=1e-5)
    with torch.no_grad():                                    # again, now that U is not zero
        for param in admm.params:
            param.add_(torch.randn_like(param))
    weights, u_prev = [p.detach().clone() for p in admm.params], [u.clone() for u in admm.U]
    assert all(bool(u.any()) for u in u_prev)
    assert admm.update()["next_rho"] == 3.0                                  # capped at rho_max
    targets = [w + u for w, u in zip(weights, u_prev)]
    for got, target, kept in zip(admm.Z, targets, global_topk_masks(targets, admm.k)):
        assert torch.equal(got, target * kept)
    assert admm.update()["next_rho"] == 3.0


def test_a_state_dict_taken_earlier_stays_current_through_updates_and_the_hard_prune():
    torch.manual_seed(0)
    admm = ADMM(small_convnet(), ADMMConfig(sparsity=0.8, ramp_from=0.2, ramp_updates=4))
    state = admm.state_dict()
    with torch.no_grad():
        for param in admm.params:
            param.add_(torch.randn_like(param))
    kept_on_the_ramp = admm.update()["kept"]
    masks = admm.hard_prune()
    assert kept_on_the_ramp > sum(int(masks[name].sum()) for name in masks) == admm.k   # the cut recomputed the support
    for name in admm.names:
        assert torch.equal(state["support"][name], masks[name])
        assert torch.equal(state["Z"][name], admm.Z[admm.names.index(name)])
        assert torch.equal(state["U"][name], admm.U[admm.names.index(name)])


def test_admm_converges_to_the_projection_of_the_unconstrained_optimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10, bias=False), nn.Linear(10, 5, bias=False))
    targets = [torch.randn(10, 20), torch.randn(5, 10) * 0.5]
    admm = ADMM(model, ADMMConfig(sparsity=0.7, rho=0.05, rho_multiplier=1.5, rho_max=5.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    residuals = []
    for _ in range(15):
        for _ in range(20):
            optimizer.zero_grad()
            sum(0.5 * (p - t).pow(2).sum() for p, t in zip(model.parameters(), targets)).backward()
            admm.add_penalty_grad()
            optimizer.step()
        residuals.append(admm.update()["primal_residual"])
    assert residuals[-1] < 1e-3 * max(residuals)
    expected = global_topk_masks(targets, kept_count(250, 0.7))
    masks = admm.hard_prune()
    for name, want, param, target in zip(masks, expected, model.parameters(), targets):
        assert torch.equal(masks[name], want)
        assert torch.equal(param.detach() != 0, want)
        torch.testing.assert_close(param.detach(), target * want, atol=0.02, rtol=0)


def test_ramp_raises_the_target_along_a_cubic_then_holds_it():
    torch.manual_seed(0)
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.9, ramp_from=0.5, ramp_updates=3))
    total = sum(p.numel() for p in admm.params)
    kept = [sum(int(m.sum()) for m in admm.support)]
    for _ in range(5):
        with torch.no_grad():
            for param in admm.params:
                param.add_(0.1 * torch.randn_like(param))
        kept.append(admm.update()["kept"])
    fractions = [0.0, 1 - (2 / 3) ** 3, 1 - (1 / 3) ** 3, 1.0, 1.0, 1.0]
    assert kept == [kept_count(total, 0.5 + 0.4 * f) for f in fractions]
    assert kept[0] > kept[1] > kept[2] > kept[3] == admm.k


def test_hard_prune_before_the_ramp_ends_cuts_at_the_target():
    torch.manual_seed(0)
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.8, ramp_from=0.2, ramp_updates=4))
    admm.update()
    targets = [p.detach() + u for p, u in zip(admm.params, admm.U)]
    masks = admm.hard_prune()
    assert sum(int(masks[name].sum()) for name in masks) == admm.k
    for want, name in zip(global_topk_masks(targets, admm.k), masks):
        assert torch.equal(masks[name], want)


def test_layerwise_ramp_moves_every_layer_toward_its_own_ratio():
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.5, scope="layerwise", layer_sparsity={"7.*": 0.9},
                                  ramp_from=0.3, ramp_updates=2))
    start = [int(m.sum()) for m in admm.support]
    assert start == [kept_count(p.numel(), 0.3) for p in admm.params]
    admm.update()
    admm.update()
    final = [0.9 if name.startswith("7.") else 0.5 for name in admm.names]
    assert [int(m.sum()) for m in admm.support] == [kept_count(p.numel(), s) for p, s in zip(admm.params, final)]


@pytest.mark.parametrize("kwargs", [dict(ramp_from=0.9), dict(ramp_from=0.95), dict(ramp_from=0.5, ramp_updates=0),
                                    dict(ramp_from=-0.1, ramp_updates=2)])
def test_bad_ramp_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="ramp"):
        ADMMConfig(sparsity=0.9, **kwargs)


def test_state_from_another_ramp_is_refused():
    model = small_convnet()
    state = ADMM(model, ADMMConfig(sparsity=0.8, ramp_from=0.5, ramp_updates=2)).state_dict()
    with pytest.raises(ValueError, match="ramp"):
        ADMM(model, ADMMConfig(sparsity=0.8)).load_state_dict(state)


def test_layerwise_scope_uses_per_layer_ratios_and_floors_protect_layers():
    model = small_convnet()
    config = ADMMConfig(sparsity=0.5, scope="layerwise", layer_sparsity={"3.*": 0.9, "re:^7": 0.25})
    admm = ADMM(model, config)
    assert [int(m.sum()) for m in admm.support] == [round(0.5 * 216), round(0.1 * 576), round(0.75 * 160)]
    with torch.no_grad():
        model[7].weight.mul_(1e-4)                           # tiny layer: global ranking would empty it
    emptied = ADMM(model, ADMMConfig(sparsity=0.9))
    floored = ADMM(model, ADMMConfig(sparsity=0.9, min_density={"7.weight": 0.05}))
    assert int(emptied.support[2].sum()) == 0
    assert int(floored.support[2].sum()) == 8                # ceil(0.05 * 160)
    assert sum(int(m.sum()) for m in floored.support) == kept_count(952, 0.9)


# ---- state and resume --------------------------------------------------------------------------

def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = small_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    admm = ADMM(model, ADMMConfig(sparsity=0.8, rho=0.01, rho_multiplier=1.3, rho_max=0.1))
    callback = ADMMCallback(admm, steps_per_update=3)
    return SimpleNamespace(model=model, optimizer=optimizer, ema=None), callback


def test_resumed_run_equals_uninterrupted_run_exactly(tmp_path):
    trainer, callback = make_run()
    train_steps(trainer, callback, 0, 14)
    masks = callback.admm.hard_prune()

    first, first_callback = make_run()
    train_steps(first, first_callback, 0, 7)
    torch.save({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
                "callback": first_callback.state_dict()}, tmp_path / "ckpt.pt")
    resumed, resumed_callback = make_run(seed=123)       # fresh objects, different init
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.model.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_callback.load_state_dict(checkpoint["callback"])
    train_steps(resumed, resumed_callback, 7, 7)
    resumed_masks = resumed_callback.admm.hard_prune()

    assert len(callback.history) == 4 and resumed_callback.history == callback.history
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("Z", "U", "support"):
        for name in masks:
            assert torch.equal(callback.admm.state_dict()[key][name], resumed_callback.admm.state_dict()[key][name])
    assert all(torch.equal(masks[name], resumed_masks[name]) for name in masks)
    assert resumed_callback.admm.rho == callback.admm.rho


def test_load_state_dict_rejects_a_different_run():
    trainer, callback = make_run()
    state = callback.admm.state_dict()
    other = ADMM(trainer.model, ADMMConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="ADMM state has sparsity=0.8, this run has 0.5"):
        other.load_state_dict(state)
    narrower = ADMM(trainer.model, ADMMConfig(sparsity=0.8, exclude=["7.*"]))
    with pytest.raises(ValueError, match=r"unexpected \['7.weight'\]"):
        narrower.load_state_dict(state)
    with pytest.raises(ValueError, match="ADMM state is missing"):
        callback.admm.load_state_dict({"Z": state["Z"]})


def test_admm_callback_rejects_bad_interval():
    trainer, callback = make_run()
    with pytest.raises(ValueError, match="steps_per_update must be an int >= 1, got 0"):
        ADMMCallback(callback.admm, 0)


def test_admm_callback_refuses_a_step_without_its_penalty():
    """A loop that calls after_step but not before_step (the hook that adds rho * (W - Z + U)) would
    run Z/U-steps with nothing pulling W towards Z: it stops at the first such step."""
    trainer, callback = make_run()
    train_steps(trainer, callback, 0, 2)                  # the engine's order: fine
    images, labels = batch(2)
    nn.functional.cross_entropy(trainer.model(images), labels).backward()
    trainer.optimizer.step()
    with pytest.raises(RuntimeError, match=r"without the ADMM penalty; the training loop must call before_step"):
        callback.after_step(trainer)
