"""The one training loop: hooks, AMP, gradient accumulation and clipping, EMA, checkpoints, resume.

Task code passes in `loss_fn(model, batch) -> (loss, logs)` and optionally
`evaluate(model) -> dict[str, float]`; everything task-specific stays outside. Callbacks are
duck-typed: any of `on_train_start(trainer)`, `after_backward(trainer)`, `before_step(trainer)`,
`after_step(trainer)`, `end_epoch(trainer)`, `state_dict()`, `load_state_dict(d)` (see
docs/contracts.md "engine").

Order of one optimizer step (after `accumulate` batches were back-propagated):
unscale (AMP) -> `after_backward` -> clip -> `before_step` -> `optimizer.step()` -> `after_step`
-> EMA update -> scheduler (when stepping per step). What `before_step` adds to the gradients
(the ADMM penalty) is not clipped. Order of one epoch: batches -> `end_epoch` -> scheduler
(per epoch) -> evaluate -> history/CSV -> checkpoint.

Under torchrun (a process group of several processes, see `engine.distributed`) the model trains
inside DistributedDataParallel, so gradients are averaged across the ranks during backward and
every hook sees the same gradients and weights on every rank. A `DistributedSampler` in the
loader gets `set_epoch` each epoch. The logged loss is the mean over the ranks and a non-finite
loss on any rank stops every rank. Only rank 0 evaluates (the metrics are sent to the others),
writes checkpoints and the CSV, and shows a progress bar; every rank loads the resume checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn
from tqdm import tqdm

from engine import distributed
from engine.checkpoint import (atomic_write_bytes, checkpoint_epoch, checkpoint_name, find_latest_checkpoint,
                               load_checkpoint, load_error_summary, remove_older_checkpoints, save_checkpoint)
from engine.ema import ModelEMA, unwrap
from engine.interrupts import held_iteration
from engine.rng import capture_rng_state, restore_rng_state

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]
EvaluateFn = Callable[[nn.Module], "dict[str, float]"]
HOOKS = ("on_train_start", "after_backward", "before_step", "after_step", "end_epoch")


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite; `checkpoint` is the last good one."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """Settings of one `Trainer` run.

    Attributes:
        epochs: total epochs `fit()` trains to (counting epochs done before a resume).
        device: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available.
        amp: mixed precision (float16 autocast + GradScaler); only ever active on CUDA.
        accumulate: batches whose mean gradient makes one optimizer step (an epoch's last step
            may have fewer, when the batches do not divide; their mean all the same, whatever the
            loader's length says, or without one).
        clip_grad_norm: max total L2 norm of the gradients, None for no clipping.
        ema: keep an exponential moving average of the weights (`trainer.ema`).
        ema_decay, ema_tau: its asymptotic decay and ramp length in optimizer steps.
        checkpoint_dir: where `epoch_NNNN.pt` files go; None writes none. A run that does not
            resume refuses a folder that already holds checkpoints.
        save_every: write a checkpoint every this many epochs (the last epoch is always written).
        keep_last: keep only this many newest checkpoints in `checkpoint_dir` (None keeps all).
        resume: a checkpoint file, or a directory meaning its newest checkpoint.
        log_csv: per-epoch history as CSV (rewritten atomically each epoch); None for none.
        eval_every: run `evaluate` every this many epochs (and after the last); 0 never.
        scheduler_interval: call `scheduler.step()` once per "epoch" or once per optimizer "step".
        progress: show a tqdm bar per epoch.
        desc: label of the progress bar.
    """

    epochs: int = 1
    device: str | None = None
    amp: bool = True
    accumulate: int = 1
    clip_grad_norm: float | None = None
    ema: bool = False
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    checkpoint_dir: str | os.PathLike | None = None
    save_every: int = 1
    keep_last: int | None = 2
    resume: str | os.PathLike | None = None
    log_csv: str | os.PathLike | None = None
    eval_every: int = 1
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        minimum = {"epochs": 0, "accumulate": 1, "save_every": 1, "eval_every": 0}
        for name, lowest in minimum.items():
            if getattr(self, name) < lowest:
                raise ValueError(f"TrainConfig.{name} must be >= {lowest}, found {getattr(self, name)}")
        if self.scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"TrainConfig.scheduler_interval must be 'epoch' or 'step', "
                             f"found {self.scheduler_interval!r}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"TrainConfig.keep_last must be >= 1 or None, found {self.keep_last}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"TrainConfig.clip_grad_norm must be > 0 or None, found {self.clip_grad_norm}")


class Trainer:
    """Runs `loss_fn` over `train_loader` for the configured epochs, with the hooks above.

    Attributes:
        model, optimizer, scheduler, callbacks: as given (the model is moved to `device`);
            `model` stays the bare module, also under DDP.
        ddp_model: the DistributedDataParallel wrapper the loss runs through when several
            processes train together (see `engine.distributed`), else None.
        ema: an `engine.ModelEMA` (its `.module` is the averaged copy) or None.
        epoch: during an epoch (hooks included) its 0-based index; between epochs and after
            `fit`, the number of completed epochs.
        step: optimizer steps taken so far.
        history: one dict per completed epoch (means of the loss logs, lr, eval metrics, time).
        last_checkpoint: path of the newest checkpoint written or resumed from, or None.
        target_epochs: the epoch count the current (or last) `fit` trains to.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 train_loader: Iterable, config: TrainConfig, callbacks: list | None = None,
                 scheduler: Any = None, evaluate: EvaluateFn | None = None):
        self.config = config
        self.device = distributed.local_device(distributed.resolve_device(config.device))
        self.model = model.to(self.device)
        self.ddp_model = distributed.wrap_model(self.model, self.device) if distributed.is_distributed() else None
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.callbacks = list(callbacks or [])
        self.scheduler = scheduler
        self.evaluate = evaluate
        self.use_amp = bool(config.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.ema = ModelEMA(self.model, config.ema_decay, config.ema_tau) if config.ema else None
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self.target_epochs = config.epochs
        self._resume_pending = config.resume is not None

    # ----------------------------------------------------------------------------- the loop
    def fit(self, epochs: int | None = None) -> list[dict[str, float]]:
        """Train until `epochs` (default `config.epochs`) epochs are complete; returns `history`.

        Resumes from `config.resume` on the first call. Raises NonFiniteLossError (keeping the
        last good checkpoint untouched) when the loss stops being finite.
        """
        total = self.config.epochs if epochs is None else epochs
        self.target_epochs = total
        if self._resume_pending:
            self._load_callback_states(self._load_resume_state())   # before on_train_start, which uses them
            self._refuse_later_checkpoints()
            if self.epoch > total:
                warnings.warn(f"{self.last_checkpoint}: the run is at epoch {self.epoch}, past the {total} epochs "
                              f"asked for: nothing is trained", stacklevel=2)
        elif self.epoch == 0 and self.step == 0:
            self._refuse_earlier_checkpoints()
        self._call("on_train_start")
        while self.epoch < total:
            started = time.perf_counter()
            train_logs = self._train_one_epoch()
            self._call("end_epoch")
            if self.config.scheduler_interval == "epoch":
                self._step_scheduler()
            metrics = self._maybe_evaluate(is_last=self.epoch + 1 == total)
            self.epoch += 1
            self._record_epoch(train_logs, metrics, time.perf_counter() - started)
            if self.config.checkpoint_dir is not None and (
                    self.epoch % self.config.save_every == 0 or self.epoch == total):
                self.save_checkpoint()
        return self.history

    def _train_one_epoch(self) -> dict[str, float]:
        """One pass over `train_loader`; returns the mean of "loss" and of each log key (over all ranks)."""
        module = self.model if self.ddp_model is None else self.ddp_model
        module.train()
        self.optimizer.zero_grad(set_to_none=True)
        set_epoch = _set_epoch_of(self.train_loader)
        if set_epoch is not None:
            set_epoch(self.epoch)  # a DistributedSampler's permutation for this epoch
        sums: dict[str, float] = defaultdict(float)
        batches = pending = 0
        synced = True            # the gradients so far were averaged over the ranks (always, alone)
        length = _length(self.train_loader)
        bar = tqdm(held_iteration(self.train_loader), total=length,  # workers start and stop with Ctrl-C held
                   desc=f"{self.config.desc} {self.epoch + 1}/{self.target_epochs}",
                   disable=not (self.config.progress and distributed.is_main()), leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = move_to_device(batch, self.device)
            ends_step = pending + 1 == self.config.accumulate or length is None or batches + 1 >= length
            synced = ends_step or self.ddp_model is None
            with self._gradient_sync(ends_step):
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                    loss, logs = self.loss_fn(module, batch)
                loss_value = float(distributed.mean_across_ranks(loss.detach()))
                if not math.isfinite(loss_value):
                    self._stop_on_non_finite(loss_value, batches)
                self.scaler.scale(loss / self.config.accumulate).backward()
            pending += 1
            if pending == self.config.accumulate:
                self._optimizer_step()
                pending = 0
            batches += 1
            sums["loss"] += loss_value
            for key, value in logs.items():
                sums[key] += float(value)
            bar.set_postfix(loss=f"{sums['loss'] / batches:.4g}", refresh=False)
        if pending:              # the epoch's last step has fewer batches: their mean, not sum / accumulate
            if not synced:       # the loader ended before its length: nothing averaged this step's batches
                distributed.average_gradients(self.model.parameters())
            self._scale_gradients(self.config.accumulate / pending)
            self._optimizer_step()
        return self._mean_logs(sums, batches)

    def _scale_gradients(self, factor: float) -> None:
        """Multiply the accumulated gradients by `factor` (before unscaling: it is linear). Every
        batch's loss is divided by `accumulate`, whatever the loader's length says (a length that
        is wrong, or none, cannot then mix divisors within a step); a short last step is rescaled."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def _gradient_sync(self, ends_step: bool) -> contextlib.AbstractContextManager:
        """Under DDP, skip the gradient all-reduce of batches that only accumulate (`no_sync`)."""
        if self.ddp_model is None or ends_step:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def _mean_logs(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        """Per-batch means of the summed logs, averaged over the ranks (the same on every rank)."""
        keys = list(sums)
        totals = [sums[key] for key in keys]
        if distributed.is_distributed():
            reduced = distributed.mean_across_ranks(torch.tensor(totals, dtype=torch.float64, device=self.device))
            totals = reduced.tolist()
        return {key: total / max(batches, 1) for key, total in zip(keys, totals)}

    def _optimizer_step(self) -> None:
        """Unscale, hooks, clip, hooks, step, EMA, per-step scheduler; then clear the gradients."""
        self.scaler.unscale_(self.optimizer)
        self._call("after_backward")
        if self.config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
        self._call("before_step")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self._call("after_step")
        if self.ema is not None:
            self.ema.update(self.model)
        if self.config.scheduler_interval == "step":
            self._step_scheduler()
        self.optimizer.zero_grad(set_to_none=True)

    def _step_scheduler(self) -> None:
        """Advance the LR schedule, which follows the batches even when GradScaler skipped the optimizer
        step (gradients that overflowed; often the first). On a schedule's first step torch reports
        that case as calls out of order; they are not, so under AMP that one warning is silenced there.
        (Only there: entering `catch_warnings` resets Python's record of warnings already shown.)"""
        if self.scheduler is None:
            return
        if not (self.scaler.is_enabled() and self.scheduler.last_epoch == 0):
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                                    category=UserWarning)
            self.scheduler.step()

    def _stop_on_non_finite(self, loss_value: float, batch_index: int) -> None:
        where = self.last_checkpoint if self.last_checkpoint is not None else "none was written"
        raise NonFiniteLossError(
            f"non-finite loss ({loss_value}) at epoch {self.epoch + 1}, batch {batch_index}, "
            f"optimizer step {self.step}: training stopped; last good checkpoint: {where}",
            self.last_checkpoint)

    def _maybe_evaluate(self, is_last: bool) -> dict[str, float]:
        """`evaluate` on the EMA copy (or the model) when due; under DDP on rank 0, sent to every rank.

        It runs on a fork of torch's random streams: iterating a DataLoader draws a seed from them, and
        training's shuffles must not depend on how often (or on which rank) the model is evaluated.
        """
        every = self.config.eval_every
        if self.evaluate is None or every == 0 or not (is_last or (self.epoch + 1) % every == 0):
            return {}
        metrics = None
        if distributed.is_main():
            model = self.ema.module if self.ema is not None else self.model
            was_training = model.training
            model.eval()
            cuda_devices = [self.device] if self.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
                metrics = {key: float(value) for key, value in self.evaluate(model).items()}
            model.train(was_training)
        return distributed.broadcast_object(metrics)

    def _record_epoch(self, train_logs: dict[str, float], metrics: dict[str, float], seconds: float) -> None:
        record = {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                  **{f"train/{key}": value for key, value in train_logs.items()},
                  **{f"eval/{key}": value for key, value in metrics.items()}, "seconds": seconds}
        self.history.append(record)
        if self.config.log_csv is not None and distributed.is_main():
            write_history_csv(self.history, self.config.log_csv)

    def _call(self, hook: str) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self)

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly: weights, optimizer, RNG, callbacks..."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "callbacks": {key: cb.state_dict() for key, cb in self._stateful_callbacks().items()},
            "rng": capture_rng_state(),
            "history": list(self.history),
            "config": {key: str(value) if isinstance(value, os.PathLike) else value
                       for key, value in asdict(self.config).items()},
        }

    def save_checkpoint(self) -> Path:
        """Write `checkpoint_dir/epoch_NNNN.pt` atomically; returns its path.

        Under DDP only rank 0 writes, and every rank waits until the file is there. The file holds
        every rank's random streams (`rng_per_rank`), which can differ (e.g. each rank's CUDA
        stream, or augmentations that draw more for some images), so each resumes its own.
        """
        if self.config.checkpoint_dir is None:
            raise ValueError("TrainConfig.checkpoint_dir is not set: nowhere to save a checkpoint")
        rng_per_rank = distributed.all_gather_object(capture_rng_state()) if distributed.is_distributed() else None
        if distributed.is_main():
            state = self.state_dict()
            if rng_per_rank is not None:
                state["rng_per_rank"] = rng_per_rank
            self.last_checkpoint = save_checkpoint(state, self.config.checkpoint_dir)
            if self.config.keep_last is not None:
                remove_older_checkpoints(self.config.checkpoint_dir, self.config.keep_last)
        else:
            self.last_checkpoint = Path(self.config.checkpoint_dir) / checkpoint_name(self.epoch)
        distributed.barrier()
        return self.last_checkpoint

    def _refuse_earlier_checkpoints(self) -> None:
        """A new run must not write into a folder of another run's checkpoints: keeping the newest
        by epoch would delete its own, and a later resume would continue the other run. Rank 0
        looks; every rank raises."""
        folder = self.config.checkpoint_dir
        latest = find_latest_checkpoint(folder) if folder is not None and distributed.is_main() else None
        latest = distributed.broadcast_object(latest)
        if latest is not None:
            raise distributed.EveryRankError(f"{folder}: holds the checkpoints of an earlier run (newest: "
                                             f"{Path(latest).name}); resume that run, or train into a folder "
                                             f"without checkpoints")

    def _refuse_later_checkpoints(self) -> None:
        """A resumed run must not write into a folder that holds checkpoints past its resume point
        (another run's, or this run's abandoned future): keeping the newest by epoch would delete the
        checkpoints it writes, and a later resume would continue those. Rank 0 looks; every rank raises."""
        folder = self.config.checkpoint_dir
        latest = find_latest_checkpoint(folder) if folder is not None and distributed.is_main() else None
        latest = distributed.broadcast_object(latest)
        if latest is not None and checkpoint_epoch(latest) > self.epoch:
            raise distributed.EveryRankError(f"{folder}: holds checkpoints past the resumed epoch {self.epoch} "
                                             f"(newest: {Path(latest).name}), which keeping the newest would prefer "
                                             f"to this run's; resume from the newest, or write into a folder without "
                                             f"them")

    def _load_resume_state(self) -> dict[str, Any]:
        """Restore everything but the callbacks from `config.resume`; returns the callbacks' states."""
        self._resume_pending = False
        path = Path(self.config.resume)
        if path.is_dir():                                # its newest checkpoint, named in messages
            path = find_latest_checkpoint(path) or path
        path = Path(distributed.broadcast_object(str(path)))   # rank 0's, which a shared folder shows all
        with distributed.checked_on_every_rank():               # a bad checkpoint: said once
            state = load_checkpoint(path, map_location=self.device)
            try:
                unwrap(self.model).load_state_dict(state["model"])
            except RuntimeError as error:
                raise ValueError(f"{path}: the checkpoint's weights do not fit the model being trained: "
                                 f"{load_error_summary(error)}") from error
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:                  # a checkpoint of a run without one: start it here
            warnings.warn(f"{path}: the checkpoint holds no weight average (EMA); the average starts from "
                          f"its weights", stacklevel=2)
            self.ema = ModelEMA(self.model, self.config.ema_decay, self.config.ema_tau, updates=int(state["step"]))
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state.get("history", []))
        per_rank = state.get("rng_per_rank")      # a DDP run's; on as many ranks, each takes its own
        same_world = per_rank is not None and len(per_rank) == distributed.world_size()
        restore_rng_state(per_rank[distributed.rank()] if same_world else state["rng"])
        self.last_checkpoint = path
        return {"path": path, "callbacks": state.get("callbacks", {})}

    def _load_callback_states(self, saved: dict[str, Any]) -> None:
        stateful = self._stateful_callbacks()
        if set(stateful) != set(saved["callbacks"]):
            raise ValueError(f"{saved['path']}: checkpoint holds callback states {sorted(saved['callbacks'])}, "
                             f"but this trainer has stateful callbacks {sorted(stateful)}")
        for key, callback in stateful.items():
            try:
                callback.load_state_dict(saved["callbacks"][key])
            except ValueError as error:               # e.g. an ADMM state of another sparsity
                raise ValueError(f"{saved['path']}: {error}") from error

    def _stateful_callbacks(self) -> dict[str, Any]:
        return {f"{index}.{type(cb).__name__}": cb for index, cb in enumerate(self.callbacks)
                if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))}


def _set_epoch_of(loader: Iterable) -> Callable[[int], None] | None:
    """The loader's batch sampler's `set_epoch`, else its sampler's, else None."""
    for holder in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        set_epoch = getattr(holder, "set_epoch", None)
        if callable(set_epoch):
            return set_epoch
    return None


def _length(loader: Iterable) -> int | None:
    """Batches per epoch, or None when the loader has no length."""
    try:
        return len(loader)
    except TypeError:
        return None


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested tuple / list / dict) batch to `device`; other leaves as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def write_history_csv(history: list[dict[str, float]], path: str | os.PathLike) -> None:
    """Write the per-epoch records as CSV (columns in order of first appearance), atomically."""
    columns: list[str] = []
    for record in history:
        columns.extend(key for key in record if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
