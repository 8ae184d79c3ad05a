"""Masks: pruned weights and optimizer state stay zero under SGD/Adam/AdamW, EMA, AMP, DDP; packing; resume."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from pruning import Masks, MaskCallback, magnitude_prune, pack_mask, unpack_mask

from helpers import small_convnet


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2000 + step)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator)


class AveragedCopy:
    """A minimal EMA with the engine's shape: ``.module`` is the averaged copy."""

    def __init__(self, model: nn.Module, decay: float = 0.9):
        self.module = copy.deepcopy(model)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for averaged, current in zip(self.module.parameters(), model.parameters()):
            averaged.mul_(self.decay).add_(current.detach(), alpha=1 - self.decay)


def masked_train(trainer, callback, first_step: int, count: int, autocast: bool = False, check=None) -> None:
    for step in range(first_step, first_step + count):
        images, labels = batch(step)
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(trainer.model(images), labels)
        loss.backward()
        callback.after_backward(trainer)
        trainer.optimizer.step()
        if trainer.ema is not None:
            trainer.ema.update(trainer.model)
        callback.after_step(trainer)
        if check is not None:
            check()


def assert_pruned_positions_zero(masks: Masks, model: nn.Module, optimizer=None) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params[name]
        assert torch.count_nonzero(param.detach()[~mask]) == 0, name
        if optimizer is not None:
            for key, value in optimizer.state[param].items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert torch.count_nonzero(value[~mask]) == 0, (name, key)


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masks_survive_many_optimizer_steps_with_state_and_ema(name):
    torch.manual_seed(0)
    model = small_convnet()
    optimizer = OPTIMIZERS[name](model.parameters())
    masked_train(SimpleNamespace(model=model, optimizer=optimizer, ema=None), SimpleNamespace(
        after_backward=lambda t: None, after_step=lambda t: None), 0, 3)      # dense steps: state is nonzero
    trainer = SimpleNamespace(model=model, optimizer=optimizer, ema=AveragedCopy(model))
    masks = magnitude_prune(model, 0.8)
    callback = MaskCallback(masks)
    callback.on_train_start(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masked_train(trainer, callback, 3, 25, check=lambda: assert_pruned_positions_zero(masks, model, optimizer))
    assert_pruned_positions_zero(masks, trainer.ema.module)
    for name_, mask in masks.items():                                       # kept weights did train
        assert not torch.equal(model.get_parameter(name_).detach()[mask], before[name_][mask])
    expected_state = {"sgd-momentum-wd": {"momentum_buffer"}, "adam": {"exp_avg", "exp_avg_sq"},
                      "adamw-amsgrad": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}}[name]
    assert expected_state <= set(optimizer.state[model[0].weight])


class PullsTowardEarlierWeights(torch.optim.SGD):
    """An optimizer that moves weights whose gradient is zero, as Lookahead does toward a slow copy
    (here kept outside ``optimizer.state``, where no mask reaches it)."""

    def __init__(self, params, **kwargs):
        params = list(params)
        super().__init__(params, **kwargs)
        self.earlier = [param.detach().clone() for param in params]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for param, earlier in zip(self.param_groups[0]["params"], self.earlier):
            param.lerp_(earlier, 0.5)
        return loss


def test_masks_are_applied_after_every_step_whatever_the_optimizer_does():
    torch.manual_seed(0)
    model = small_convnet()
    optimizer = PullsTowardEarlierWeights(model.parameters(), lr=0.05)     # the dense weights: the slow copy
    masks = magnitude_prune(model, 0.8)
    trainer = SimpleNamespace(model=model, optimizer=optimizer, ema=None)
    callback = MaskCallback(masks)
    callback.on_train_start(trainer)
    masked_train(trainer, callback, 0, 5, check=lambda: assert_pruned_positions_zero(masks, model))


def test_apply_clears_existing_optimizer_state_and_ema_given_as_module():
    torch.manual_seed(0)
    model = small_convnet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    noop = SimpleNamespace(after_backward=lambda t: None, after_step=lambda t: None)
    masked_train(SimpleNamespace(model=model, optimizer=optimizer, ema=None), noop, 0, 2)
    ema_copy = copy.deepcopy(model)
    masks = Masks({"0.weight": torch.rand(8, 3, 3, 3) > 0.5, "7.weight": torch.rand(5, 32) > 0.5})
    masks.apply(model, optimizer, ema=ema_copy)
    assert_pruned_positions_zero(masks, model, optimizer)
    assert_pruned_positions_zero(masks, ema_copy)
    assert torch.count_nonzero(optimizer.state[model[3].weight]["exp_avg"]) > 0       # unmasked layer untouched


def test_masked_weights_stay_zero_under_autocast():
    torch.manual_seed(0)
    model = small_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masks = magnitude_prune(model, 0.9, scope="uniform")
    trainer = SimpleNamespace(model=model, optimizer=optimizer, ema=None)
    masked_train(trainer, MaskCallback(masks), 0, 10, autocast=True,
                 check=lambda: assert_pruned_positions_zero(masks, model, optimizer))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_masks_bind_to_ddp_wrapped_model(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        bare = small_convnet()
        model = nn.parallel.DistributedDataParallel(bare)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        masks = magnitude_prune(model, 0.7)
        assert list(masks) == ["0.weight", "3.weight", "7.weight"]
        trainer = SimpleNamespace(model=model, optimizer=optimizer, ema=AveragedCopy(bare))
        masked_train(trainer, MaskCallback(masks), 0, 5,
                     check=lambda: assert_pruned_positions_zero(masks, bare, optimizer))
        assert_pruned_positions_zero(masks, trainer.ema.module)
    finally:
        dist.destroy_process_group()


def test_resumed_masked_retraining_equals_uninterrupted(tmp_path):
    def make(seed):
        torch.manual_seed(seed)
        model = small_convnet()
        masks = magnitude_prune(model, 0.75)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return SimpleNamespace(model=model, optimizer=optimizer, ema=None), MaskCallback(masks)

    trainer, callback = make(0)
    masked_train(trainer, callback, 0, 10)
    first, first_callback = make(0)
    masked_train(first, first_callback, 0, 5)
    torch.save({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
                "callback": first_callback.state_dict()}, tmp_path / "ckpt.pt")
    resumed, resumed_callback = make(7)
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed.model.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_callback.load_state_dict(checkpoint["callback"])
    masked_train(resumed, resumed_callback, 5, 5)
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_mask_grads_zeroes_only_pruned_gradients():
    model = small_convnet()
    masks = Masks.from_model(model)
    masks = Masks({name: torch.rand_like(m, dtype=torch.float) > 0.5 for name, m in masks.items()})
    images, labels = batch(0)
    nn.functional.cross_entropy(model(images), labels).backward()
    dense = model[0].weight.grad.clone()
    masks.mask_grads(model)
    assert torch.equal(model[0].weight.grad, dense * masks["0.weight"])


def test_apply_follows_new_masks_new_dtype_and_replaced_parameters():
    """apply caches its 0/1 factors per device and dtype: they must follow load_state_dict, a mask
    changed in place, a model cast to another dtype, and a parameter object the model replaced."""
    model = small_convnet()
    masks = magnitude_prune(model, 0.5)
    nn.init.normal_(model[0].weight)
    other = {name: ~mask for name, mask in masks.items()}                  # the complement
    masks.load_state_dict(other)
    masks.apply(model)
    assert_pruned_positions_zero(masks, model)
    assert torch.count_nonzero(model[0].weight.detach()[other["0.weight"]]) > 0
    masks["0.weight"][0] = False                                           # in place: filter 0 pruned
    nn.init.normal_(model[0].weight)
    masks.apply(model)
    assert torch.count_nonzero(model[0].weight.detach()[0]) == 0
    assert_pruned_positions_zero(masks, model)
    model.double()
    nn.init.normal_(model[0].weight)
    masks.apply(model)
    assert model[0].weight.dtype == torch.float64
    assert_pruned_positions_zero(masks, model)
    replaced = nn.Parameter(torch.randn_like(model[0].weight))
    model.load_state_dict({**model.state_dict(), "0.weight": replaced}, assign=True)
    masks.apply(model)
    assert model[0].weight is replaced and torch.count_nonzero(replaced.detach()[~other["0.weight"]]) == 0


def test_stats_from_model_and_state_dict_round_trip():
    model = small_convnet()
    masks = magnitude_prune(model, 0.5)
    stats = masks.stats()
    assert stats["params"] == 216 + 576 + 160 and stats["kept"] == round(0.5 * 952)
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    rebuilt = Masks.from_model(model)
    assert all(torch.equal(rebuilt[n], masks[n]) for n in masks)
    copy_ = Masks({"module." + n: m for n, m in masks.state_dict().items()})          # names canonicalised
    assert list(copy_) == list(masks)


def test_bad_masks_are_clear_errors():
    model = small_convnet()
    with pytest.raises(ValueError, match="mask for 'head.weight' has no parameter of that name in Sequential"):
        Masks({"head.weight": torch.ones(3, dtype=torch.bool)}).apply(model)
    with pytest.raises(ValueError, match=r"mask for '7.weight' has shape \(5, 31\), parameter has \(5, 32\)"):
        Masks({"7.weight": torch.ones(5, 31, dtype=torch.bool)}).apply(model)
    with pytest.raises(ValueError, match="mask for '7.weight' must be a bool Tensor, got torch.float32"):
        Masks({"7.weight": torch.ones(5, 32)})
    with pytest.raises(ValueError, match="ema must be an nn.Module or have a .module"):
        Masks.from_model(model).apply(model, ema=object())


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
def test_pack_mask_matches_numpy_packbits_and_round_trips(numel):
    mask = torch.rand(numel) > 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numpy().tobytes() == np.packbits(mask.numpy()).tobytes()
    assert torch.equal(unpack_mask(packed, (numel,)), mask)
    if numel == 1001:
        assert torch.equal(unpack_mask(pack_mask(mask.view(7, 11, 13)), (7, 11, 13)), mask.view(7, 11, 13))
        with pytest.raises(ValueError, match=r"packed mask for shape \(1000,\) must be 125 uint8 bytes, got 126"):
            unpack_mask(packed, (1000,))


def test_masks_made_under_inference_mode_work_outside_it():
    """Found by a review: inference tensors have no version counter, which the factor cache reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.inference_mode():
        masks = magnitude_prune(model, 0.5)
        again = Masks.from_model(model)
    assert not any(mask.is_inference() for _, mask in masks.items())
    for weight in (model[0].weight, model[1].weight):
        weight.grad = torch.ones_like(weight)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    again.mask_grads(model)
    again.apply(model)
    assert torch.equal(model[0].weight != 0, masks["0.weight"])
    assert torch.equal(model[1].weight.grad != 0, masks["1.weight"])
    assert int(sum(mask.sum() for _, mask in again.items())) == 40    # half of 80 weights kept
