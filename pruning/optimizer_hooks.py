"""ADMM and fixed masks bound to an optimizer's ``step()``, for training loops that offer no hook
between backward and the step (Ultralytics' trainer, hand-written loops, other frameworks).

``torch.optim.Optimizer`` runs step pre-hooks right before the update and post-hooks right after it.
Under AMP, ``GradScaler.step`` unscales the gradients before calling ``step()`` and skips the call
when they hold inf/NaN. Fused optimizers (``fused=True``) are the exception: their ``step()`` is
always called, with gradients that are still scaled unless ``scaler.unscale_`` ran first, and
``optimizer.grad_scale`` / ``found_inf`` set for the kernel to unscale and skip. The ADMM hook then
scales its penalty by ``grad_scale``; on a step the kernel skips, the hooks' work is discarded
with the gradients (the masks' post-hook only zeroes what is already zero).

    hooks = pruning.attach_admm(optimizer, admm)      # grad += rho * (W - Z + U) before every step
    ...                                               # train; admm.update() every few epochs
    hooks.remove()
    masks = admm.hard_prune()
    hooks = pruning.attach_masks(optimizer, model, masks, ema=ema_model)
"""
from __future__ import annotations

from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from pruning.admm import ADMM, check_minimises
from pruning.masks import Masks


class StepHooks:
    """The hooks registered on one optimizer; ``remove()`` detaches them all."""

    def __init__(self, handles: list[RemovableHandle]):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def attach_admm(optimizer: Optimizer, admm: ADMM) -> StepHooks:
    """Add the W-step penalty ``rho * (W - Z + U)`` to the gradients before every ``optimizer.step()``.

    The penalty is added once per step, after gradient accumulation and clipping, which is where
    ``ADMM.add_penalty_grad`` belongs in any loop. Not for ``step(closure)`` (LBFGS): the closure
    computes the gradients again after the hook (a ValueError says so), nor for an optimizer that
    maximises (``check_minimises``).
    """
    check_minimises(optimizer)

    def add_penalty(_optimizer, args, kwargs) -> None:
        refuse_closure(args, kwargs, "add the penalty with admm.add_penalty_grad()")
        check_minimises(optimizer)
        admm.add_penalty_grad(getattr(optimizer, "grad_scale", None))   # set by GradScaler for fused optimizers

    return StepHooks([optimizer.register_step_pre_hook(add_penalty)])


def attach_masks(optimizer: Optimizer, model: nn.Module, masks: Masks, ema: object = None) -> StepHooks:
    """Keep ``model``'s pruned weights at zero through every ``optimizer.step()``.

    Before the step the pruned gradients are zeroed; after it the pruned weights, their optimizer
    state (momentum, Adam moments) and, if given, the same weights of ``ema`` (an ``nn.Module`` or
    an object whose ``.module`` is one) are zeroed, so weight decay and momentum cannot revive them.
    A loop that clips the gradients' norm before the step should call ``masks.mask_grads(model)``
    before clipping, or the clip counts the pruned gradients too (``ultralytics_callbacks`` does so
    for Ultralytics' trainer). Not for ``step(closure)`` (LBFGS), whose closure computes the
    gradients again after the pre-hook (a ValueError says so).
    """
    def mask_grads(_optimizer, args, kwargs) -> None:
        refuse_closure(args, kwargs, "zero the pruned gradients with masks.mask_grads(model)")
        masks.mask_grads(model)

    return StepHooks([
        optimizer.register_step_pre_hook(mask_grads),
        optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: masks.apply(model, optimizer, ema)),
    ])


def refuse_closure(args: tuple, kwargs: dict, instead: str) -> None:
    """Raise for ``optimizer.step(closure)``: a hook before the step cannot reach the gradients the
    closure computes. (A step hook's ``args`` are the step's, the optimizer first.)"""
    if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
        raise ValueError(f"optimizer.step(closure) computes the gradients after this hook runs, so the hook "
                         f"cannot change them; inside the closure, after backward, {instead} instead")
