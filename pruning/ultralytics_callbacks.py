"""Global ADMM, hard pruning and masked retraining inside one Ultralytics training run.

Ultralytics' trainer has no callback between backward and ``optimizer.step()``, so the W-step
penalty and the masks ride on the optimizer's step hooks (``pruning.optimizer_hooks``); the
callbacks below only build the state, run the Z/U-steps at epoch ends and switch phases. Nothing
here imports ultralytics: the callbacks read ``trainer.model``, ``trainer.optimizer``,
``trainer.ema.ema``, ``trainer.epoch``, ``trainer.epochs``, ``trainer.start_epoch``,
``trainer.args.resume``, ``trainer.args.save``, ``trainer.args.save_period``, ``trainer.wdir`` and
``trainer.save_dir``, move their own entry to the end of ``trainer.callbacks["on_train_end"]``, reset
``trainer.best_fitness`` and ``trainer.stopper.best_fitness``, and after the cut wrap
``trainer.optimizer_step`` (tested with ultralytics 8.4).

    from ultralytics import YOLO
    pruner = UltralyticsADMM(ADMMConfig(sparsity=0.8, rho=0.1, rho_multiplier=2.0), admm_iters=4, epochs_per_iter=2)
    model = YOLO("yolov8n.pt")
    pruner.register(model)
    model.train(data="coco.yaml", epochs=pruner.admm_epochs + 8)    # 8 ADMM epochs, then 8 retraining

Epochs ``0 .. admm_epochs - 1`` train with the ADMM penalty; after every ``epochs_per_iter`` of
them the Z- and U-steps run. At the end of the last ADMM epoch the weights are cut to Z's support
(model, optimizer state and EMA), and that epoch's validation scores the hard-pruned model. Early
stopping is held off during the ADMM phase; it and the trainer's best fitness restart at the cut,
so ``best.pt`` always comes from a pruned epoch. The remaining epochs retrain with the masks
fixed. A run that ends before the cut (a ``time=`` limit, a stop) raises at its end rather than
leave unpruned weights unremarked; its on_train_end runs after every other one, so the loggers'
still run.

Frozen weights (``requires_grad=False``, such as the DFL convolution Ultralytics freezes) are
never pruned: training could not adapt to their removal. Ultralytics clips the loss gradient to a
total norm of 10 before each step (in ``trainer.optimizer_step``); the penalty is added after that,
unclipped, so rho weighs against a loss gradient of norm at most 10. After the cut the pruned
gradients are zeroed before that clip, so that it measures the kept weights' gradient alone.

The ADMM or mask state is written atomically to ``weights/admm_state.pt`` at the end of every
epoch, the one before kept as ``admm_state.previous.pt``, so one of them always matches
``last.pt`` (a repeated epoch overwrites its own file and keeps the one before):
``model.train(resume=True)`` with a pruner registered again continues from it, and so does
Ultralytics' NaN recovery, which reloads ``last.pt`` and repeats the epoch, up to three times. With
``save_period=N`` the state after each epoch that gets an ``epoch{E}.pt`` is also kept, as
``admm_state.epoch{E}.pt``, so a run resumes from any of those checkpoints too. A resume whose pruner
has another config, ``admm_iters`` or ``epochs_per_iter`` than the state's is refused. With
``save=False`` no checkpoint is written to resume from, and no state either. Ultralytics resumes
from the fp16 EMA weights of ``last.pt``, so a resumed run is close to, not bit-identical with, an
uninterrupted one. Under DDP (``device=0,1``) Ultralytics 8.4 pickles the callbacks into each
worker process: the pruning then runs there (untested; rank 0 alone writes the state) and this
object stays empty; the run folder has the results.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pruning.admm import ADMM, ADMMConfig
from pruning.masks import Masks
from pruning.optimizer_hooks import StepHooks, attach_admm, attach_masks
from pruning.report import layer_table, save_kept_fraction_plot, table_totals
from pruning.selection import prunable_parameters
from pruning.atomic_file import write_bytes_atomically

STATE_FILE = "admm_state.pt"   # in trainer.wdir, beside last.pt
PREVIOUS_STATE_FILE = "admm_state.previous.pt"
PERIODIC_STATE_FILE = "admm_state.epoch{}.pt"   # beside Ultralytics' epoch{E}.pt (save_period)
REPORT_FILE = "pruning.json"   # in trainer.save_dir
PLOT_FILE = "pruning_layers.png"


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Canonical names of the Conv/Linear weights that do not train (``requires_grad=False``): never
    prune them."""
    return [name for name, param in prunable_parameters(model).items() if not param.requires_grad]


def mask_grads_before_clipping(trainer, masks: Masks) -> Callable[[], None]:
    """Zero the pruned gradients as ``trainer.optimizer_step`` starts; returns what undoes that.

    Ultralytics' ``optimizer_step`` clips all gradients to a total norm of 10 before
    ``optimizer.step()``, where ``attach_masks`` zeroes the pruned ones: counted by the clip, they
    would shrink the kept weights' steps (by about 40% on a YOLOv8n with 80% removed)."""
    optimizer_step, had_own = trainer.optimizer_step, "optimizer_step" in vars(trainer)

    def masked_optimizer_step():
        masks.mask_grads(trainer.model)
        optimizer_step()

    def undo() -> None:
        if had_own:
            trainer.optimizer_step = optimizer_step
        else:
            vars(trainer).pop("optimizer_step", None)       # the class's own again

    trainer.optimizer_step = masked_optimizer_step
    return undo


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
        self._unwrap_optimizer_step: Callable[[], None] | None = None
        self._epochs_ended = 0          # epochs whose end this object has handled, to notice a repeated one
        self._state_file_epoch: int | None = None     # the epoch STATE_FILE holds, when this object knows it

    @property
    def admm_epochs(self) -> int:
        """Epochs of the ADMM phase; ``model.train(epochs=...)`` must be at least this."""
        return self.admm_iters * self.epochs_per_iter

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_train_start": self.on_train_start,
            "on_train_epoch_start": self.on_train_epoch_start,
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_train_end": self.on_train_end,
        }

    def register(self, yolo) -> None:
        """Add the callbacks to an ``ultralytics.YOLO`` (anything with ``add_callback(event, fn)``)."""
        for event, callback in self.callbacks().items():
            yolo.add_callback(event, callback)

    def on_train_start(self, trainer) -> None:
        teacher = getattr(trainer.args, "distill_model", None)
        if teacher is not None:
            raise ValueError(
                f"UltralyticsADMM does not prune a distillation run (distill_model={teacher!r}): the"
                f" trainer's model then holds training-only projector convolutions that would take part of"
                f" the global budget, and the saved student would miss the target sparsity; train without"
                f" distill_model"
            )
        if trainer.epochs < self.admm_epochs:
            raise ValueError(
                f"UltralyticsADMM needs epochs >= {self.admm_epochs} ({self.admm_iters} ADMM iterations of"
                f" {self.epochs_per_iter} epochs, then retraining), got epochs={trainer.epochs}"
            )
        self._end_last(trainer)
        self._detach()
        self.admm, self.masks, self.history = None, None, []
        self._epochs_ended, self._state_file_epoch = trainer.start_epoch, None
        if trainer.args.resume and trainer.start_epoch > 0:
            self._restore(trainer, trainer.start_epoch - 1)
        else:
            self.admm = ADMM(trainer.model, self._config_for(trainer.model))
            self._attach(trainer)

    def on_train_epoch_start(self, trainer) -> None:
        if trainer.epoch < self._epochs_ended:          # NaN recovery reloaded last.pt and repeats this epoch
            self._restore(trainer, trainer.epoch - 1)
            self._epochs_ended = trainer.epoch

    def on_train_epoch_end(self, trainer) -> None:
        done = trainer.epoch + 1
        if self.admm is not None:
            trainer.stopper.best_fitness = 0.0          # no early stop before the cut
            if done % self.epochs_per_iter == 0:
                self.history.append({"epoch": done, **self.admm.update()})
            if done == self.admm_epochs:
                self._detach()
                self.masks = self.admm.hard_prune()
                self.admm = None
                self._attach(trainer)
                trainer.best_fitness = None             # best.pt from pruned epochs only; this one is the first
        self._epochs_ended = done
        self._save_state(trainer)

    def on_train_end(self, trainer) -> None:
        self._detach()
        if self.masks is None:
            raise RuntimeError(
                f"training ended after {self._epochs_ended} epoch{'' if self._epochs_ended == 1 else 's'}, "
                f"before the cut at the end of epoch"
                f" {self.admm_epochs} (a time limit or a stop?): {trainer.save_dir} holds unpruned weights, and"
                f" Ultralytics has stripped last.pt for good; train again with epochs >= {self.admm_epochs}"
                f" (and no time= limit, or one long enough for them: time= sets epochs)"
            )
        rows = layer_table(trainer.model, self.masks)
        ema = getattr(trainer, "ema", None)
        saved = ema.ema if ema is not None else trainer.model           # what last.pt holds (best.pt: a pruned epoch's EMA)
        measured = layer_table(saved, include=list(self.masks))          # its nonzero weights, same layers
        report = {
            "config": dataclasses.asdict(self.config),
            "admm_iters": self.admm_iters,
            "epochs_per_iter": self.epochs_per_iter,
            "mask": table_totals(rows),
            "nonzero_in_saved_weights": table_totals(measured),
            "admm_history": self.history,
            "layers": rows,
        }
        save_dir = Path(trainer.save_dir)
        write_bytes_atomically(save_dir / REPORT_FILE, (json.dumps(report, indent=2, default=str) + "\n").encode())
        save_kept_fraction_plot(rows, save_dir / PLOT_FILE, title=f"kept per layer at {self.config.sparsity:.0%} removed")

    def _end_last(self, trainer) -> None:
        """Move this object's on_train_end behind every other one (Ultralytics adds its loggers'
        after ours), so that raising there for a run cut short skips none of them."""
        ends = getattr(trainer, "callbacks", {}).get("on_train_end")
        if isinstance(ends, list) and self.on_train_end in ends:
            ends.remove(self.on_train_end)
            ends.append(self.on_train_end)

    def _config_for(self, model: nn.Module) -> ADMMConfig:
        """The run's config with frozen weights added to the exclusions."""
        frozen = frozen_parameter_names(model)
        if not frozen:
            return self.config
        return dataclasses.replace(self.config, exclude=[*(self.config.exclude or []), *frozen])

    def _attach(self, trainer) -> None:
        """Bind the current phase to the trainer's optimizer (and its current EMA, which Ultralytics
        replaces when it reloads a checkpoint)."""
        self._detach()
        if self.masks is None:
            self._hooks = attach_admm(trainer.optimizer, self.admm)
            return
        ema = trainer.ema.ema if getattr(trainer, "ema", None) is not None else None
        self.masks.apply(trainer.model, trainer.optimizer, ema)
        self._hooks = attach_masks(trainer.optimizer, trainer.model, self.masks, ema)
        self._unwrap_optimizer_step = mask_grads_before_clipping(trainer, self.masks)

    def _detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._unwrap_optimizer_step is not None:
            self._unwrap_optimizer_step()
            self._unwrap_optimizer_step = None

    def _settings(self) -> dict:
        """What a resumed run must share with the run that saved the state (tuples as lists)."""
        return json.loads(json.dumps({"config": dataclasses.asdict(self.config), "admm_iters": self.admm_iters,
                                      "epochs_per_iter": self.epochs_per_iter}, default=str))

    def _save_state(self, trainer) -> None:
        """The state after this epoch, atomically (rank 0 only, and only when Ultralytics saves
        checkpoints). The file it replaces moves to PREVIOUS_STATE_FILE, unless it is from this same
        epoch (a repeated one): then the state after the epoch before, which the repeat started from,
        stays there. An epoch that gets a periodic ``epoch{E}.pt`` also gets its PERIODIC_STATE_FILE."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        if not trainer.args.save:
            return
        state = {
            "epoch": trainer.epoch,
            "admm": None if self.admm is None else self.admm.state_dict(),
            "masks": None if self.masks is None else self.masks.state_dict(),
            "history": self.history,
            "settings": self._settings(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        wdir = Path(trainer.wdir)
        if (wdir / STATE_FILE).is_file() and self._state_file_epoch != trainer.epoch:
            os.replace(wdir / STATE_FILE, wdir / PREVIOUS_STATE_FILE)
        write_bytes_atomically(wdir / STATE_FILE, buffer.getvalue())
        self._state_file_epoch = trainer.epoch
        period = trainer.args.save_period
        if period > 0 and trainer.epoch % period == 0:       # Ultralytics' own test for epoch{E}.pt
            write_bytes_atomically(wdir / PERIODIC_STATE_FILE.format(trainer.epoch), buffer.getvalue())

    def _restore(self, trainer, epoch: int) -> None:
        """Take the state saved after ``epoch`` (0-based; the epoch of the checkpoint the trainer loaded)."""
        wdir = Path(trainer.wdir)
        saved_epochs, state, path = {}, None, None
        for name in (STATE_FILE, PREVIOUS_STATE_FILE, PERIODIC_STATE_FILE.format(epoch)):
            if (wdir / name).is_file():
                loaded = torch.load(wdir / name, map_location="cpu", weights_only=True)
                saved_epochs[name] = loaded["epoch"]
                if loaded["epoch"] == epoch:
                    state, path = loaded, wdir / name
                    break
        if state is None:
            found = ", ".join(f"{name} after epoch {done + 1}" for name, done in saved_epochs.items())
            raise FileNotFoundError(
                f"{wdir}: the checkpoint continues after epoch {epoch + 1}, so the pruning state saved after that"
                f" epoch ({STATE_FILE}, {PREVIOUS_STATE_FILE} or {PERIODIC_STATE_FILE.format(epoch)}) is needed;"
                f" found {found or 'none of them'}"
            )
        self._check_settings(state.get("settings"), path)
        self._state_file_epoch = saved_epochs.get(STATE_FILE)
        self.history = list(state["history"])
        self.admm, self.masks = None, None
        if state["masks"] is not None:
            self.masks = Masks(state["masks"]).to(next(trainer.model.parameters()).device)
        else:
            self.admm = ADMM(trainer.model, self._config_for(trainer.model))
            try:
                self.admm.load_state_dict(state["admm"])
            except ValueError as error:                     # the frozen weights, which are never pruned, moved
                raise ValueError(f"{path}: {error}; the frozen layers (freeze=) are left out of the pruned set, so"
                                 f" resume with the freeze= the run started with") from None
        self._attach(trainer)

    def _check_settings(self, saved: dict | None, path: Path) -> None:
        """Refuse a state saved with other settings: a resumed run would cut at another epoch, or never.
        A state from before settings were saved (None) is taken as it is."""
        if saved is None:
            return
        before, now = _flat_settings(saved), _flat_settings(self._settings())
        changes = [f"{key}: {before.get(key)!r} -> {now[key]!r}" for key in sorted(now) if before.get(key) != now[key]]
        if changes:
            raise ValueError(f"{path}: saved by a pruner with other settings ({'; '.join(changes)}); resume with the"
                             f" settings the run started with, or start a new run")


def _flat_settings(settings: dict) -> dict:
    """``{"config": {...}, "admm_iters": ...}`` as one level: ``{"config.rho": ..., "admm_iters": ...}``,
    with an include or exclude pattern saved as one string (before ADMMConfig listed it) as a list."""
    config = {f"config.{key}": [value] if key in ("include", "exclude") and isinstance(value, str) else value
              for key, value in settings["config"].items()}
    return {**config, **{key: value for key, value in settings.items() if key != "config"}}
