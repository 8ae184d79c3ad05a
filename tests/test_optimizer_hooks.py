"""ADMM and masks bound to optimizer.step(): the same W-step as the explicit call, nothing on a step
GradScaler skips, pruned weights and optimizer state held at zero, and removable."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning import ADMM, ADMMConfig, attach_admm, attach_masks, magnitude_prune

from helpers import small_convnet


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3000 + step)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator)


def backward(model: nn.Module, step: int) -> None:
    images, labels = batch(step)
    nn.functional.cross_entropy(model(images), labels).backward()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def explicit_and_hooked_runs():
    """Two identical (model, ADMM, SGD) triples; the second has the ADMM bound to its optimizer."""
    torch.manual_seed(0)
    explicit_model = small_convnet()
    hooked_model = copy.deepcopy(explicit_model)
    config = ADMMConfig(sparsity=0.7, rho=0.5)
    explicit = (explicit_model, ADMM(explicit_model, config), sgd(explicit_model))
    hooked = (hooked_model, ADMM(hooked_model, config), sgd(hooked_model))
    attach_admm(hooked[2], hooked[1])
    return explicit, hooked


def test_admm_pre_hook_gives_the_explicit_w_step_bit_for_bit():
    (explicit_model, explicit_admm, explicit_opt), (hooked_model, hooked_admm, hooked_opt) = explicit_and_hooked_runs()
    for step in range(6):
        for model, optimizer in ((explicit_model, explicit_opt), (hooked_model, hooked_opt)):
            optimizer.zero_grad(set_to_none=True)
            backward(model, step)
        explicit_admm.add_penalty_grad()
        explicit_opt.step()
        hooked_opt.step()
        if step % 3 == 2:
            explicit_admm.update()
            hooked_admm.update()
    for explicit, hooked in zip(explicit_model.parameters(), hooked_model.parameters()):
        assert torch.equal(explicit, hooked)
    assert all(torch.equal(a, b) for a, b in zip(explicit_admm.U, hooked_admm.U))


def test_admm_pre_hook_changes_the_step_and_is_removed_by_remove():
    torch.manual_seed(0)
    model = small_convnet()
    plain = copy.deepcopy(model)
    admm = ADMM(model, ADMMConfig(sparsity=0.7, rho=0.5))
    optimizer, plain_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(plain.parameters(), lr=0.1)
    hooks = attach_admm(optimizer, admm)
    for m, opt in ((model, optimizer), (plain, plain_opt)):
        backward(m, 0)
        opt.step()
    weight = admm.params[0]
    assert not torch.equal(weight, dict(plain.named_parameters())[admm.names[0]])
    hooks.remove()
    for m, opt in ((model, optimizer), (plain, plain_opt)):
        opt.zero_grad(set_to_none=True)
        backward(m, 1)
    before = weight.detach().clone()
    expected = before.add(weight.grad, alpha=-0.1)       # what SGD computes, and nothing more
    optimizer.step()
    assert torch.equal(weight.detach(), expected)          # no penalty once removed


def test_a_step_that_grad_scaler_skips_adds_no_penalty_and_changes_nothing():
    torch.manual_seed(0)
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.7, rho=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_admm(optimizer, admm)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    images, labels = batch(0)
    scaler.scale(nn.functional.cross_entropy(model(images), labels)).backward()
    admm.params[1].grad[0, 0, 0, 0] = float("inf")
    grads_before = [param.grad.clone() for param in admm.params[:1]]
    weights_before = [param.detach().clone() for param in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))
    assert torch.equal(admm.params[0].grad, grads_before[0] / 1024.0)   # unscaled, no penalty added
    assert scaler.get_scale() == 512.0


def test_a_step_with_a_closure_is_refused_by_both_hooks():
    """Found by a review: step(closure) computes the gradients after the pre-hook, so the penalty
    (or the masking) was silently lost."""
    model = small_convnet()
    optimizer = sgd(model)

    def closure():
        optimizer.zero_grad()
        backward(model, 0)

    hooks = attach_admm(optimizer, ADMM(model, ADMMConfig(sparsity=0.5)))
    with pytest.raises(ValueError, match="inside the closure, after backward, add the penalty with admm.add_penalty_grad"):
        optimizer.step(closure)
    hooks.remove()
    attach_masks(optimizer, model, magnitude_prune(model, 0.5))
    with pytest.raises(ValueError, match="zero the pruned gradients with masks.mask_grads"):
        optimizer.step(closure=closure)
    backward(model, 1)
    optimizer.step()                                          # without a closure: as before


def test_an_optimizer_that_maximises_is_refused_by_the_admm_hook_and_callback():
    """Found by a review: ascending the penalty gradient pushes W away from Z (a primal residual of
    329 instead of 0.01 after 5 updates), silently. Refused at attach, and at a step when a group
    that maximises is added later."""
    from engine import Trainer, TrainConfig
    from pruning import ADMMCallback

    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="param group 0 has maximize=True"):
        attach_admm(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), admm)
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.SGD([p for name, p in model.named_parameters() if not name.endswith("bias")], lr=0.1)
    attach_admm(optimizer, admm)
    optimizer.add_param_group({"params": biases, "maximize": True})
    backward(model, 0)
    with pytest.raises(ValueError, match="param group 1 has maximize=True"):
        optimizer.step()
    loader = [(torch.randn(2, 3, 16, 16),)]
    loss = lambda module, batch: (module(batch[0]).square().mean(), {})
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), maximize=True), loss, loader,
                      TrainConfig(epochs=1, device="cpu", progress=False), callbacks=[ADMMCallback(admm, 1)])
    with pytest.raises(ValueError, match="Adam param group 0 has maximize=True"):
        trainer.fit()


def test_admm_pre_hook_sees_unscaled_gradients_under_grad_scaler():
    (reference, reference_admm, reference_opt), (model, _, optimizer) = explicit_and_hooked_runs()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        reference_opt.zero_grad(set_to_none=True)
        images, labels = batch(step)
        scaler.scale(nn.functional.cross_entropy(model(images), labels)).backward()
        scaler.step(optimizer)
        scaler.update()
        backward(reference, step)
        reference_admm.add_penalty_grad()
        reference_opt.step()
    for hooked, explicit in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(hooked, explicit, rtol=1e-5, atol=1e-6)   # power-of-2 scaling: float-exact up to rounding


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.01),
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
], ids=["sgd-nesterov-wd", "adam-wd", "adamw"])
def test_mask_hooks_keep_pruned_weights_state_and_ema_at_zero(make_optimizer):
    torch.manual_seed(0)
    model = small_convnet()
    optimizer = make_optimizer(model.parameters())
    for step in range(3):                      # dense steps first, so the optimizer state is nonzero everywhere
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
    ema = copy.deepcopy(model)
    masks = magnitude_prune(model, 0.8)
    hooks = attach_masks(optimizer, model, masks, ema=ema)
    for step in range(3, 9):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        params, averaged = dict(model.named_parameters()), dict(ema.named_parameters())
        for name, mask in masks.items():
            assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
            assert torch.count_nonzero(averaged[name].detach()[~mask]) == 0, name
            for key, value in optimizer.state[params[name]].items():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    assert torch.count_nonzero(value[~mask]) == 0, (name, key)
    hooks.remove()
    optimizer.zero_grad()
    backward(model, 9)
    optimizer.step()                           # unbound: weight decay and momentum move pruned weights again
    params = dict(model.named_parameters())
    assert any(torch.count_nonzero(params[name].detach()[~mask]) > 0 for name, mask in masks.items())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_admm_pre_hook_scales_its_penalty_for_a_fused_optimizer_stepping_scaled_gradients(device):
    """GradScaler hands a fused optimizer still-scaled gradients (and ``grad_scale``); the penalty
    must reach the update as if the gradients had been unscaled first."""
    torch.manual_seed(0)
    model = small_convnet().to(device)
    reference = copy.deepcopy(model)
    config = ADMMConfig(sparsity=0.7, rho=0.5)
    admm, reference_admm = ADMM(model, config), ADMM(reference, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=0.01, fused=True)
    attach_admm(optimizer, admm)
    scaler, reference_scaler = (torch.amp.GradScaler(device, init_scale=2.0 ** 10) for _ in range(2))
    for step in range(3):
        images, labels = (tensor.to(device) for tensor in batch(step))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(nn.functional.cross_entropy(model(images), labels)).backward()
        scaler.step(optimizer)                  # no unscale_ first: the fused kernel unscales
        scaler.update()
        reference_opt.zero_grad(set_to_none=True)
        reference_scaler.scale(nn.functional.cross_entropy(reference(images), labels)).backward()
        reference_scaler.unscale_(reference_opt)
        reference_admm.add_penalty_grad()
        reference_scaler.step(reference_opt)
        reference_scaler.update()
    # the penalised weights; the conv bias before BatchNorm has a zero gradient up to rounding, which
    # Adam turns into full-size steps of either sign, so it is no measure of the penalty
    for hooked, explicit in zip(admm.params, reference_admm.params):
        torch.testing.assert_close(hooked, explicit, rtol=1e-5, atol=1e-6)
