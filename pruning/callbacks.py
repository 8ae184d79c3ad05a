"""Training callbacks that plug ADMM and fixed masks into any loop with the engine's hooks.

Duck-typed to ``engine.Trainer`` (see docs/contracts.md): they read only ``trainer.model``,
``trainer.optimizer`` and ``trainer.ema`` (None, or an object whose ``.module`` is the EMA copy),
so any loop that calls the same hooks can use them.
"""
from __future__ import annotations

from collections.abc import Mapping

from pruning.admm import ADMM, check_minimises
from pruning.masks import Masks


class ADMMCallback:
    """W-step penalty before every optimizer step (after any clipping); Z/U update every
    ``steps_per_update`` optimizer steps.

    ``history`` holds one dict per update: ``step`` plus what ``ADMM.update()`` returns.
    """

    def __init__(self, admm: ADMM, steps_per_update: int):
        if isinstance(steps_per_update, bool) or not isinstance(steps_per_update, int) or steps_per_update < 1:
            raise ValueError(f"steps_per_update must be an int >= 1, got {steps_per_update!r}")
        self.admm = admm
        self.steps_per_update = steps_per_update
        self.steps = 0
        self.history: list[dict] = []
        self._penalty_added = False

    def before_step(self, trainer) -> None:
        check_minimises(trainer.optimizer)
        self.admm.add_penalty_grad()   # after any gradient clipping: rho weighs unclipped
        self._penalty_added = True

    def after_step(self, trainer) -> None:
        if not self._penalty_added:
            raise RuntimeError("ADMMCallback: an optimizer step without the ADMM penalty; the training loop must "
                               "call before_step(trainer) before each optimizer step (engine.Trainer does)")
        self._penalty_added = False
        self.steps += 1
        if self.steps % self.steps_per_update == 0:
            self.history.append({"step": self.steps, **self.admm.update()})

    def state_dict(self) -> dict:
        return {"admm": self.admm.state_dict(), "steps": self.steps, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping) -> None:
        self.admm.load_state_dict(state["admm"])
        self.steps = int(state["steps"])
        self.history = [dict(h) for h in state["history"]]


class MaskCallback:
    """Masked retraining: pruned gradients zeroed before each step; weights, optimizer state and
    the EMA copy re-zeroed after it (and once at the start)."""

    def __init__(self, masks: Masks):
        self.masks = masks

    def on_train_start(self, trainer) -> None:
        self.masks.apply(trainer.model, trainer.optimizer, getattr(trainer, "ema", None))

    def after_backward(self, trainer) -> None:
        self.masks.mask_grads(trainer.model)

    def after_step(self, trainer) -> None:
        self.masks.apply(trainer.model, trainer.optimizer, getattr(trainer, "ema", None))

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.masks.load_state_dict(state["masks"])
