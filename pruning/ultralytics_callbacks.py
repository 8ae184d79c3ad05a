"""Global ADMM, hard pruning and masked retraining inside one Ultralytics training run.

Ultralytics' trainer has no callback between backward and ``optimizer.step()``, so the W-step
penalty and the masks ride on the optimizer's step hooks (``pruning.optimizer_hooks``); the
callbacks below only build the state, run the Z/U-steps at epoch ends and switch phases. Nothing
here imports ultralytics: the callbacks read ``trainer.model``, ``trainer.optimizer``,
``trainer.ema.ema``, ``trainer.epoch``, ``trainer.epochs``, ``trainer.start_epoch``,
``trainer.args.resume``, ``trainer.wdir`` and ``trainer.save_dir``, and reset
``trainer.best_fitness`` and ``trainer.stopper.best_fitness`` (tested with ultralytics 8.4).

    from ultralytics import YOLO
    pruner = UltralyticsADMM(ADMMConfig(sparsity=0.8, rho=1e-3, rho_multiplier=2.0), admm_iters=4, epochs_per_iter=2)
    model = YOLO("yolov8n.pt")
    pruner.register(model)
    model.train(data="coco.yaml", epochs=pruner.admm_epochs + 10)   # 8 ADMM epochs, then 10 retraining

Epochs ``0 .. admm_epochs - 1`` train with the ADMM penalty; after every ``epochs_per_iter`` of
them the Z- and U-steps run. At the end of the last ADMM epoch the weights are cut to Z's support
(model, optimizer state and EMA), and that epoch's validation scores the hard-pruned model. The
trainer's best fitness and early stopping restart there, so ``best.pt`` always comes from a pruned
epoch. The remaining epochs retrain with the masks fixed.

Frozen weights (``requires_grad=False``, such as the DFL convolution Ultralytics freezes) are
never pruned: training could not adapt to their removal. Ultralytics multiplies its detection loss
by the batch size and accumulates gradients up to a nominal batch of 64 images (``nbs``) per step,
so its gradients are about 64 times those of a per-image mean loss: for the same balance between
loss and penalty, rho must be about 64 times what a mean-loss loop would use.

The ADMM or mask state is written atomically to ``weights/admm_state.pt`` after every checkpoint,
and ``model.train(resume=True)`` with a pruner registered again continues from it. Ultralytics
resumes from the fp16 EMA weights of ``last.pt``, so a resumed run is close to, not bit-identical
with, an uninterrupted one. Multi-GPU runs are not supported: Ultralytics starts DDP workers in
fresh processes that do not carry callbacks.
"""
from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning.admm import ADMM, ADMMConfig
from pruning.masks import Masks
from pruning.optimizer_hooks import StepHooks, attach_admm, attach_masks
from pruning.report import layer_table, save_kept_fraction_plot, table_totals
from pruning.selection import canonical_parameters
from pruning.sparse_archive import write_bytes_atomically

STATE_FILE = "admm_state.pt"   # in trainer.wdir, beside last.pt
REPORT_FILE = "pruning.json"   # in trainer.save_dir
PLOT_FILE = "pruning_layers.png"


class UltralyticsADMM:
    """Callbacks for ``ultralytics.YOLO.add_callback``: global (or layer-wise) ADMM for
    ``admm_iters * epochs_per_iter`` epochs, then hard pruning and masked retraining.

    Attributes:
        admm: the ADMM state during the ADMM phase (None before training and after the cut).
        masks: the fixed masks after the cut (None before).
        history: one dict per Z/U-step: ``epoch`` plus what ``ADMM.update()`` returns.
    """

    def __init__(self, config: ADMMConfig, admm_iters: int, epochs_per_iter: int = 1):
        for name, value in (("admm_iters", admm_iters), ("epochs_per_iter", epochs_per_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if config.ramp_from is not None and config.ramp_updates > admm_iters:
            raise ValueError(f"ramp_updates ({config.ramp_updates}) must be <= admm_iters ({admm_iters})")
        self.config = config
        self.admm_iters = admm_iters
        self.epochs_per_iter = epochs_per_iter
        self.admm: ADMM | None = None
        self.masks: Masks | None = None
        self.history: list[dict] = []
        self._hooks: StepHooks | None = None

    @property
    def admm_epochs(self) -> int:
        """Epochs of the ADMM phase; ``model.train(epochs=...)`` must be at least this."""
        return self.admm_iters * self.epochs_per_iter

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_train_start": self.on_train_start,
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_model_save": self.on_model_save,
            "on_train_end": self.on_train_end,
        }

    def register(self, yolo) -> None:
        """Add the callbacks to an ``ultralytics.YOLO`` (anything with ``add_callback(event, fn)``)."""
        for event, callback in self.callbacks().items():
            yolo.add_callback(event, callback)

    def on_train_start(self, trainer) -> None:
        if trainer.epochs < self.admm_epochs:
            raise ValueError(
                f"UltralyticsADMM needs epochs >= {self.admm_epochs} ({self.admm_iters} ADMM iterations of"
                f" {self.epochs_per_iter} epochs, then retraining), got epochs={trainer.epochs}"
            )
        self._detach()
        self.admm, self.masks, self.history = None, None, []
        if trainer.args.resume and trainer.start_epoch > 0:
            self._load_state(trainer)
        else:
            self.admm = ADMM(trainer.model, self._config_for(trainer.model))
        if self.masks is None:
            self._hooks = attach_admm(trainer.optimizer, self.admm)
        else:
            self._attach_masks(trainer)

    def on_train_epoch_end(self, trainer) -> None:
        if self.admm is None:
            return
        done = trainer.epoch + 1
        if done % self.epochs_per_iter == 0:
            self.history.append({"epoch": done, **self.admm.update()})
        if done == self.admm_epochs:
            self._detach()
            self.masks = self.admm.hard_prune()
            self.admm = None
            self._attach_masks(trainer)
            trainer.best_fitness = None             # best.pt from pruned epochs only; this one is the first
            trainer.stopper.best_fitness = 0.0      # early stopping restarts too

    def on_model_save(self, trainer) -> None:
        state = {
            "epoch": trainer.epoch,
            "admm": None if self.admm is None else self.admm.state_dict(),
            "masks": None if self.masks is None else self.masks.state_dict(),
            "history": self.history,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomically(Path(trainer.wdir) / STATE_FILE, buffer.getvalue())

    def on_train_end(self, trainer) -> None:
        self._detach()
        if self.masks is None:
            return
        rows = layer_table(trainer.model, self.masks)
        measured = layer_table(trainer.model, include=list(self.masks))   # nonzero weights, same layers
        report = {
            "config": dataclasses.asdict(self.config),
            "admm_iters": self.admm_iters,
            "epochs_per_iter": self.epochs_per_iter,
            "mask": table_totals(rows),
            "nonzero_after_training": table_totals(measured),
            "admm_history": self.history,
            "layers": rows,
        }
        save_dir = Path(trainer.save_dir)
        write_bytes_atomically(save_dir / REPORT_FILE, (json.dumps(report, indent=2, default=str) + "\n").encode())
        save_kept_fraction_plot(rows, save_dir / PLOT_FILE, title=f"kept per layer at {self.config.sparsity:.0%} removed")

    def _config_for(self, model: nn.Module) -> ADMMConfig:
        """The run's config with frozen weights added to the exclusions."""
        frozen = self._frozen_names(model)
        if not frozen:
            return self.config
        return dataclasses.replace(self.config, exclude=[*(self.config.exclude or []), *frozen])

    @staticmethod
    def _frozen_names(model: nn.Module) -> list[str]:
        return [name for name, param in canonical_parameters(model).items() if not param.requires_grad]

    def _attach_masks(self, trainer) -> None:
        ema = trainer.ema.ema if getattr(trainer, "ema", None) is not None else None
        self.masks.apply(trainer.model, trainer.optimizer, ema)
        self._hooks = attach_masks(trainer.optimizer, trainer.model, self.masks, ema)

    def _detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def _load_state(self, trainer) -> None:
        path = Path(trainer.wdir) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: resuming a pruning run needs the ADMM state written beside last.pt; not found"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["epoch"] != trainer.start_epoch - 1:
            raise ValueError(
                f"{path}: ADMM state is from epoch {state['epoch'] + 1}, the checkpoint resumes after epoch"
                f" {trainer.start_epoch}; expected the same epoch"
            )
        self.history = list(state["history"])
        if state["masks"] is not None:
            self.masks = Masks(state["masks"]).to(next(trainer.model.parameters()).device)
        else:
            self.admm = ADMM(trainer.model, self._config_for(trainer.model))
            self.admm.load_state_dict(state["admm"])
