"""Classifier workflows as plain functions, shared by the `classify` CLI and the benchmarks.

- `prepare(model_name, data_dir, weights, seed)`: the model (its initial weights drawn with `seed`,
  or loaded) and its datasets;
- `train_model`: dense training (cosine LR over all steps);
- `evaluate_accuracy`: top-1 accuracy in percent;
- `prune_model`: dense eval -> pruning method -> hard prune -> masked retraining -> eval.

Pruning methods (`METHODS`): "admm-global" (Lee et al. 2023: one budget over all layers),
"admm-layerwise" (Zhang et al. 2018: a ratio per layer), "magnitude-global" and
"magnitude-uniform" (one-shot baselines). Every method gets the same total number of training
epochs: ADMM spends `admm_iters * epochs_per_iter` of them on the ADMM phase and `retrain_epochs` on
masked retraining; the magnitude baselines spend all of them on masked retraining, under one cosine
LR decay to zero. Each phase has a fresh optimizer. `PruneSettings.admm_lr` sets ADMM's LR:
"constant" in the ADMM phase, then a cosine decay over retraining (the default); "cosine", a decay
to zero over each phase; "shared", one cosine over both phases, retraining continuing it from the
cut (the magnitude baselines' LR trajectory).

With `PruneSettings.distill` > 0, every method trains its pruned model against a frozen copy of the
dense model as well as the labels (`classify.distill`), in the ADMM phase and in retraining.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset

import pruning
from classify.distill import DistillationLoss, frozen_copy, top1_percent
from classify.lenet5 import LeNet5
from classify.resnet56 import RESNET56_MEAN, RESNET56_STD, resnet56
from data.cifar import CIFAR10_CLASSES, CIFARDataset, decode_listing, list_cifar_split
from data.mnist import MNISTDataset, mnist_files, read_mnist_files
from data.seeded_batches import SeededBatchSampler
from engine import (Trainer, TrainConfig, atomic_torch_save, atomic_write_bytes, distributed,
                    find_latest_checkpoint, held_iteration, load_error_summary, resolve_device, seed_everything,
                    seeded_cpu_stream, unreadable_detail)

ADMM_LR_SCHEDULES = ("constant", "cosine", "shared")
METHODS = pruning.METHODS
SPLITS = ("train", "test")
OPTIMIZERS = {"adam": 1e-3, "sgd": 0.01}  # name -> default LR; "sgd" is SGD with Nesterov momentum 0.9


def load_mnist_split(files: tuple[Path, Path], split: str) -> Dataset:
    """MNIST split from its IDX files."""
    return MNISTDataset(*read_mnist_files(*files))


def find_cifar_split(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """The images of a CIFAR-10 split, `root/<split>/<class>/*.jpg`.

    Raises:
        ValueError: the class folders are not CIFAR-10's ten (the labels would shift silently).
    """
    return list_cifar_split(root, split, classes=CIFAR10_CLASSES)


def load_cifar_split(listing: tuple[list[Path], list[int], list[str]], split: str) -> Dataset:
    """CIFAR-10 split from its listing, augmented for training."""
    images, labels, _ = decode_listing(listing)
    return CIFARDataset(images, labels, RESNET56_MEAN, RESNET56_STD, augment=split == "train")


@dataclass(frozen=True)
class ModelSpec:
    """What a `--model` name resolves to: its builder, its data and its default optimizer."""

    build: Callable[[], nn.Module]
    find_split: Callable[[Path, str], Any]     # a split's files, found (and checked) without reading them
    load_split: Callable[[Any, str], Dataset]  # the split from what find_split found
    optimizer: str  # a key of OPTIMIZERS
    weight_decay: float
    batch_size: int


MODELS = {
    "lenet5": ModelSpec(LeNet5, mnist_files, load_mnist_split, "adam", 0.0, 128),
    "resnet56": ModelSpec(resnet56, find_cifar_split, load_cifar_split, "sgd", 1e-4, 128),
}


@dataclass
class TrainSettings:
    """How to train and evaluate; None picks the model's default (see `MODELS`).

    Attributes:
        epochs: dense training epochs (`train_model`; `prune_model` uses `PruneSettings`).
        train_samples: images drawn per epoch, without replacement up to the train set's size
            (beyond it, further shuffled passes); None for the whole train set.
        eval_samples: size of a fixed, seeded subset of the test set; None for all of it.
        eval_every: also evaluate every this many epochs and after the last (logged in the history);
            0: never (the final accuracies are still measured).
        checkpoint_dir: trainer checkpoints go to `checkpoint_dir/<phase>/`; with `resume`, each
            phase continues from its newest checkpoint there (see `classify.run_record`).
        ema: decay of an exponential moving average of the weights (`engine.ModelEMA`) kept in dense
            training and in masked retraining, not in the ADMM phase (whose weights the Z-step
            projects); the phase's evaluations and its final weights are the average's. None: off.
        ema_tau: the average's warm-up in optimizer steps: its decay is ema * (1 - exp(-steps / ema_tau))
            (`engine.ModelEMA`; 0: none), so a phase of few steps averages few.
    """

    epochs: int = 10
    batch_size: int | None = None
    optimizer: str | None = None  # a key of OPTIMIZERS
    lr: float | None = None       # None: the optimizer's default in OPTIMIZERS
    device: str | None = None
    train_samples: int | None = None
    eval_samples: int | None = None
    eval_every: int = 1
    workers: int = 0
    seed: int = 0
    progress: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = False
    ema: float | None = None
    ema_tau: float = 2000.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "train_samples", "eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, found {value}")
        if self.epochs < 0 or self.workers < 0 or self.eval_every < 0:
            raise ValueError(f"epochs, workers and eval_every must be >= 0, found {self.epochs}, {self.workers} "
                             f"and {self.eval_every}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, found {self.lr}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint_dir (--checkpoint-dir) to continue from")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, found {self.optimizer!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema (the average's decay) must be in (0, 1), found {self.ema}")
        if not (math.isfinite(self.ema_tau) and self.ema_tau >= 0):
            raise ValueError(f"ema_tau (the average's warm-up in steps) must be a finite number >= 0, "
                             f"found {self.ema_tau}")


@dataclass
class PruneSettings:
    """The pruning method and its schedule (see the module docstring for the shared budget)."""

    sparsity: float
    method: str = "admm-global"
    admm_iters: int = 3
    epochs_per_iter: int = 1
    rho: float = 1e-3
    rho_mult: float = 1.0
    rho_max: float | None = None  # None: no cap
    retrain_epochs: int = 3
    layer_sparsity: Mapping[str, float] | None = field(default=None)
    include: list[str] | None = None  # parameter-name patterns that may be pruned (None: every Conv/Linear weight)
    exclude: list[str] | None = None  # parameter-name patterns never pruned
    min_density: float | Mapping[str, float] = 0.0  # keep at least this fraction of every (or each matched) layer
    ramp_from: float | None = None  # progressive sparsity: the initial Z's sparsity (None: none)
    ramp_iters: int | None = None   # ADMM iterations to reach `sparsity` (None: two thirds of them)
    distill: float = 0.0            # weight of distillation from the dense model (0: labels only)
    distill_temperature: float = 4.0
    admm_lr: str = "constant"       # "constant", "cosine" or "shared" (see the module docstring)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights removed), found {self.sparsity}")
        pruning.pruning_method(self.method)  # validates
        if self.admm_iters < 1 or self.epochs_per_iter < 1 or self.retrain_epochs < 0:
            raise ValueError(f"need admm_iters >= 1, epochs_per_iter >= 1, retrain_epochs >= 0; found "
                             f"{self.admm_iters}, {self.epochs_per_iter}, {self.retrain_epochs}")
        if not (0.0 < self.rho <= pruning.RHO_LIMIT and 1.0 <= self.rho_mult < math.inf
                and (self.rho_max is None or self.rho <= self.rho_max <= pruning.RHO_LIMIT)):
            raise ValueError(f"need rho and rho_max in (0, {pruning.RHO_LIMIT:.4g}], rho_max >= rho and rho_mult "
                             f"finite and >= 1; found rho {self.rho}, rho_mult {self.rho_mult}, rho_max "
                             f"{self.rho_max}")                             # ADMMConfig's, before the work
        if self.ramp_from is not None and pruning.pruning_method(self.method).kind != "admm":
            raise ValueError(f"ramp_from is for the ADMM methods; method {self.method!r} prunes at once")
        pruning.ramp_updates(self.sparsity, self.ramp_from, self.ramp_iters, self.admm_iters)  # validates
        densities = self.min_density.values() if isinstance(self.min_density, Mapping) else [self.min_density]
        if not all(0.0 <= density <= 1.0 for density in densities):
            raise ValueError(f"min_density must be in [0, 1] (or a mapping of patterns to such numbers), "
                             f"found {self.min_density!r}")
        if self.admm_lr not in ADMM_LR_SCHEDULES:
            raise ValueError(f"unknown admm_lr {self.admm_lr!r}; expected one of {', '.join(ADMM_LR_SCHEDULES)}")
        if not 0.0 <= self.distill <= 1.0 or not 0.0 < self.distill_temperature < math.inf:
            raise ValueError(f"need distill in [0, 1] and distill_temperature finite and > 0; found {self.distill}, "
                             f"{self.distill_temperature}")

    @property
    def admm_epochs(self) -> int:
        return self.admm_iters * self.epochs_per_iter

    @property
    def ramp_updates(self) -> int:
        return pruning.ramp_updates(self.sparsity, self.ramp_from, self.ramp_iters, self.admm_iters)

    @property
    def total_epochs(self) -> int:
        return self.admm_epochs + self.retrain_epochs


# ---------------------------------------------------------------------------------- setup
def model_spec(model_name: str) -> ModelSpec:
    """The `ModelSpec` of `model_name`; ValueError listing the known names otherwise."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[model_name]


def prepare(model_name: str, data_dir: str | os.PathLike, weights: str | os.PathLike | None = None,
            splits: tuple[str, ...] = SPLITS, seed: int = 0) -> tuple[nn.Module, dict[str, Dataset]]:
    """Build `model_name` (`build_model`, then loading `weights` when given) and read the
    requested data splits (every split's files are found before any is read)."""
    spec = model_spec(model_name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        if data_dir.exists():
            raise ValueError(f"{data_dir}: expected a data directory, found a file (give the folder that holds it)")
        raise FileNotFoundError(f"{data_dir}: data directory not found")
    found = {split: spec.find_split(data_dir, split) for split in splits}
    model = build_model(model_name, seed)
    if weights is not None:
        load_weights(model, weights)
    return model, {split: spec.load_split(found[split], split) for split in splits}


def build_model(model_name: str, seed: int = 0) -> nn.Module:
    """`model_name` with its initial weights drawn from `seed` on the CPU (torch's random streams,
    CUDA's included, are left as they were)."""
    spec = model_spec(model_name)
    with seeded_cpu_stream(seed):
        return spec.build()


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights saved as a plain state dict, a trainer checkpoint ({"model": ...}, its EMA
    average where it has one: the weights its run evaluated and wrote to --out) or a
    {"state_dict": ...} file whose keys may carry DataParallel's `module.` prefix.

    The names must match the model's exactly (BatchNorm's `num_batches_tracked`, absent from old
    files, excepted), and the values must be finite. Raises FileNotFoundError / ValueError naming
    the file and the mismatch.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ValueError(f"{path}: expected a weights file, found a folder")
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a foreign file, or a pickle of more than tensors (a whole model)
        raise ValueError(f"{path}: not a readable weights file: expected a state dict or checkpoint of tensors "
                         f"that torch.load(weights_only=True) reads, found a file it cannot unpickle") from err
    except Exception as err:  # torch raises several unrelated types for a corrupt file
        raise ValueError(f"{path}: not a readable weights file, damaged or cut short? "
                         f"({unreadable_detail(err)})") from err
    state = saved_state_dict(saved)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'model' or 'state_dict')")
    state = {pruning.canonical_name(key): value for key, value in state.items()}  # DDP / torch.compile prefixes
    expected = {key for key in model.state_dict() if not key.endswith("num_batches_tracked")}
    found = {key for key in state if not key.endswith("num_batches_tracked")}
    if expected != found:
        raise ValueError(f"{path}: parameter names differ from {type(model).__name__}: missing "
                         f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}")
    broken = [key for key, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if broken:
        raise ValueError(f"{path}: expected finite weights, found NaN or infinity in {', '.join(broken[:3])}"
                         f"{' and more' if len(broken) > 3 else ''}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"{path}: expected the shapes of {type(model).__name__}: {load_error_summary(err)}") from None
    return model


def saved_state_dict(saved: Any) -> Any:
    """The weights of what a weights file held: a trainer checkpoint's EMA average where it has one,
    else its "model"; a {"state_dict": ...} file's; or the dict itself (None for what is no dict)."""
    if not isinstance(saved, dict):
        return None
    ema = saved.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("module"), dict):
        return ema["module"]
    return saved.get("model", saved.get("state_dict", saved))


def make_train_loader(spec: ModelSpec, train_set: Dataset, settings: TrainSettings) -> DataLoader:
    """Shuffled batches; an epoch is `train_samples` images drawn without replacement up to the
    train set's size, in further shuffled passes beyond it (or all).

    Under torchrun each of the N processes gets 1/N of every global batch (DistributedSampler).
    A dataset that `augments` gets each sample's seed with its index from a `data.SeededBatchSampler`,
    which draws them in this process from torch's random stream (a checkpoint holds it): so the
    augmentation depends neither on `workers` nor on where a run was resumed.
    """
    batch_size = settings.batch_size or spec.batch_size
    if distributed.world_size() > 1:
        return _distributed_train_loader(train_set, batch_size, settings)
    sampler = RandomSampler(train_set, num_samples=settings.train_samples)
    return _loader(train_set, sampler, batch_size, settings)


def _distributed_train_loader(train_set: Dataset, batch_size: int, settings: TrainSettings) -> DataLoader:
    processes = distributed.world_size()
    if settings.train_samples is not None:
        raise ValueError("--train-samples is not supported under torchrun: every process must see the same "
                         "epoch; train on the whole set or run in one process")
    if batch_size % processes:
        raise ValueError(f"--batch-size {batch_size} (the global batch) must divide by the {processes} processes")
    sampler = distributed.distributed_sampler(train_set, shuffle=True, seed=settings.seed)
    return _loader(train_set, sampler, batch_size // processes, settings)


def _loader(train_set: Dataset, sampler: Sampler[int], batch_size: int, settings: TrainSettings) -> DataLoader:
    """Batches of `sampler`'s order; with seeds drawn here when the dataset `augments`."""
    pin_memory = resolve_device(settings.device).type == "cuda"
    if getattr(train_set, "augments", False):
        batches = SeededBatchSampler(sampler, batch_size, stream=distributed.rank())
        return DataLoader(train_set, batch_sampler=batches, num_workers=settings.workers, pin_memory=pin_memory)
    return DataLoader(train_set, batch_size, sampler=sampler, num_workers=settings.workers, pin_memory=pin_memory)


def epoch_images(train_loader: DataLoader) -> int:
    """Training images one epoch of `train_loader` draws (this process's share under torchrun)."""
    return len(train_loader.batch_sampler.sampler)   # the index order, also under a SeededBatchSampler


def make_eval_loader(spec: ModelSpec, test_set: Dataset, settings: TrainSettings) -> DataLoader:
    """In-order batches over the test set, or over a fixed subset of `eval_samples` images drawn
    with `settings.seed` (the same subset for every run with that seed)."""
    if settings.eval_samples is not None and settings.eval_samples < len(test_set):
        order = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(settings.seed))
        test_set = Subset(test_set, sorted(order[:settings.eval_samples].tolist()))
    return DataLoader(test_set, max(settings.batch_size or spec.batch_size, 256), shuffle=False,
                      num_workers=settings.workers, pin_memory=resolve_device(settings.device).type == "cuda")


def make_loaders(spec: ModelSpec, datasets: Mapping[str, Dataset],
                 settings: TrainSettings) -> tuple[DataLoader, DataLoader]:
    """(training loader, evaluation loader) over `datasets["train"]` and `datasets["test"]`."""
    return make_train_loader(spec, datasets["train"], settings), make_eval_loader(spec, datasets["test"], settings)


# ---------------------------------------------------------------------------------- train / eval
def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on a batch (images Tensor[B, C, H, W], labels Tensor[B]); logs accuracy in %."""
    images, labels = batch
    logits = model(images)
    return F.cross_entropy(logits, labels), {"acc": top1_percent(logits, labels)}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader, device: str | torch.device | None = None) -> float:
    """Top-1 accuracy in percent of `model` over `loader` (eval mode; the mode is restored after)."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in held_iteration(loader):
        logits = model(images.to(device))
        correct += int((logits.argmax(1).cpu() == labels).sum())
        total += len(labels)
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluation set is empty")
    return 100.0 * correct / total


def make_optimizer(model: nn.Module, spec: ModelSpec, name: str | None, lr: float | None) -> torch.optim.Optimizer:
    """Optimizer `name` (None: the model's default), Adam or SGD with Nesterov momentum 0.9, at `lr`
    (None: that optimizer's default LR), with the model's weight decay."""
    name = spec.optimizer if name is None else name
    lr = OPTIMIZERS[name] if lr is None else lr
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=spec.weight_decay)


def cosine_scheduler(optimizer: torch.optim.Optimizer, steps: int,
                     span: tuple[float, float] = (0.0, 1.0)) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step cosine LR decay over `steps` steps covering the part `span` of one cosine from the
    base LR (at 0) to zero (at 1): (0, 1) is a whole decay; (0.5, 1) continues one from its middle."""
    if span == (0.0, 1.0):  # the whole decay: torch's own scheduler (earlier results reproduce bit for bit)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start, end = span
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * (start + (end - start) * min(step, steps) / steps))))


def run_phase(model: nn.Module, spec: ModelSpec, loaders: tuple[DataLoader, DataLoader],
              settings: TrainSettings, epochs: int, phase: str, callbacks: list | None = None,
              lr_span: tuple[float, float] | None = (0.0, 1.0),
              loss_fn: Callable = classification_loss) -> list[dict[str, float]]:
    """Train `model` for `epochs` on `loss_fn` with a fresh optimizer through `engine.Trainer`; returns
    its history. The LR follows `lr_span` of a cosine decay (`cosine_scheduler`), or stays constant
    when `lr_span` is None. With `settings.ema`, the phase keeps a weight average, and `model` ends
    with the average's weights."""
    train_loader, eval_loader = loaders
    device = resolve_device(settings.device)
    optimizer = make_optimizer(model, spec, settings.optimizer, settings.lr)
    total_steps = max(1, epochs * len(train_loader))
    scheduler = cosine_scheduler(optimizer, total_steps, lr_span) if lr_span is not None else None
    phase_dir = Path(settings.checkpoint_dir) / phase if settings.checkpoint_dir is not None else None
    found = distributed.broadcast_object(find_latest_checkpoint(phase_dir)) if settings.resume and phase_dir else None
    resume = phase_dir if found else None                    # rank 0's view decides for every rank
    averaging = ({"ema": True, "ema_decay": settings.ema, "ema_tau": settings.ema_tau}
                 if settings.ema is not None else {})
    config = TrainConfig(epochs=epochs, device=str(device), checkpoint_dir=phase_dir, resume=resume,
                         log_csv=phase_dir / "history.csv" if phase_dir is not None else None,
                         eval_every=settings.eval_every, scheduler_interval="step",
                         progress=settings.progress, desc=phase, **averaging)
    trainer = Trainer(model, optimizer, loss_fn, train_loader, config, callbacks=callbacks,
                      scheduler=scheduler, evaluate=lambda m: {"acc": evaluate_accuracy(m, eval_loader, device)})
    history = trainer.fit()
    if trainer.ema is not None:
        model.load_state_dict(trainer.ema.module.state_dict())
    return history


def train_model(model_name: str, model: nn.Module, datasets: Mapping[str, Dataset],
                settings: TrainSettings) -> dict[str, Any]:
    """Dense training for `settings.epochs`; returns accuracy (%), history and times (`run_times`)."""
    started = time.perf_counter()
    seed_everything(settings.seed)
    spec = model_spec(model_name)
    loaders = make_loaders(spec, datasets, settings)
    history = run_phase(model, spec, loaders, settings, settings.epochs, "train")
    accuracy = evaluate_accuracy(model, loaders[1], settings.device)
    return {"model": model_name, "accuracy": accuracy, "epochs": settings.epochs,
            "eval_images": len(loaders[1].dataset), "history": history,
            **run_times(started, [history]), "settings": settings_dict(settings)}


# ---------------------------------------------------------------------------------- prune
def prune_model(model_name: str, model: nn.Module, datasets: Mapping[str, Dataset],
                prune: PruneSettings, settings: TrainSettings) -> dict[str, Any]:
    """Dense eval -> `prune.method` -> hard prune -> masked retraining -> eval.

    Returns a JSON-able dict: accuracies in % (`dense_accuracy`, `accuracy_after_hard_prune`,
    `pruned_accuracy`), the sparsity measured on the final weights over every Conv/Linear weight
    (excluded ones too: `sparsity`, `params`, `kept`) and over the prunable ones, those the method
    chose from (`prunable_sparsity`, `prunable_params`, `prunable_kept`), `mask_violations`
    (nonzero weights at pruned positions: 0 when the masks held), the per-layer table, the ADMM
    residual history, per-phase training histories (seconds per epoch included) and the times
    (`run_times`).
    """
    started = time.perf_counter()
    seed_everything(settings.seed)
    spec = model_spec(model_name)
    device = resolve_device(settings.device)
    model.to(device)
    loaders = make_loaders(spec, datasets, settings)
    dense_accuracy = evaluate_accuracy(model, loaders[1], device)
    loss_fn = (DistillationLoss(frozen_copy(model), prune.distill, prune.distill_temperature) if prune.distill
               else classification_loss)
    kind, scope = pruning.pruning_method(prune.method)
    histories: dict[str, list] = {}
    admm_updates: list[dict] = []
    if kind == "admm":
        admm = pruning.ADMM(model, pruning.ADMMConfig(
            sparsity=prune.sparsity, scope=scope, layer_sparsity=prune.layer_sparsity, rho=prune.rho,
            include=prune.include, exclude=prune.exclude, min_density=prune.min_density,
            rho_multiplier=prune.rho_mult, rho_max=prune.rho_max,
            ramp_from=prune.ramp_from, ramp_updates=prune.ramp_updates))
        callback = pruning.ADMMCallback(admm, prune.epochs_per_iter * len(loaders[0]))
        admm_span, retrain_span = admm_lr_spans(prune)
        no_average = replace(settings, ema=None)    # the Z-step projects the weights, not an average of them
        histories["admm"] = run_phase(model, spec, loaders, no_average, prune.admm_epochs, "admm", [callback],
                                      lr_span=admm_span, loss_fn=loss_fn)
        admm_updates = callback.history
        masks = admm.hard_prune()
        retrain_epochs = prune.retrain_epochs
    else:
        masks = pruning.magnitude_prune(model, prune.sparsity, scope=scope, include=prune.include,
                                        exclude=prune.exclude, min_density=prune.min_density)
        retrain_epochs, retrain_span = prune.total_epochs, (0.0, 1.0)
    masks.to(device)
    hard_accuracy = evaluate_accuracy(model, loaders[1], device)
    histories["retrain"] = run_phase(model, spec, loaders, settings, retrain_epochs, "retrain",
                                     [pruning.MaskCallback(masks)], lr_span=retrain_span, loss_fn=loss_fn)
    pruned_accuracy = evaluate_accuracy(model, loaders[1], device)
    rows = pruning.layer_table(model)
    totals = pruning.table_totals(rows)
    weights = pruning.prunable_parameters(model)             # canonical names, as the masks' (DDP, compile)
    prunable_params = sum(weights[name].numel() for name in masks)
    prunable_kept = sum(int(torch.count_nonzero(weights[name])) for name in masks)
    return {
        "model": model_name, "method": prune.method, "target_sparsity": prune.sparsity,
        "dense_accuracy": dense_accuracy, "accuracy_after_hard_prune": hard_accuracy,
        "pruned_accuracy": pruned_accuracy, "sparsity": totals["sparsity"], "params": totals["params"],
        "kept": totals["kept"], "prunable_sparsity": 1.0 - prunable_kept / prunable_params if prunable_params else 0.0,
        "prunable_params": prunable_params, "prunable_kept": prunable_kept,
        "mask_violations": count_mask_violations(model, masks), "layers": rows,
        "admm_updates": admm_updates, "history": histories,
        "epochs": {"admm": prune.admm_epochs if kind == "admm" else 0, "retrain": retrain_epochs},
        "train_images_per_epoch": epoch_images(loaders[0]) * distributed.world_size(),  # all ranks' shares
        "eval_images": len(loaders[1].dataset),
        **run_times(started, list(histories.values())),
        "settings": {"prune": asdict(prune), "train": settings_dict(settings)},
    }


def run_times(started: float, histories: list[list[dict]]) -> dict[str, float]:
    """`wall_time_s`: this process's time since `started` (a resumed run's, only since its resume);
    `train_time_s`: the epochs' time (each epoch's training, its end-of-epoch callbacks such as the
    ADMM update, and its evaluation), the epochs before a resume included (their records come back
    with the checkpoint)."""
    return {"wall_time_s": time.perf_counter() - started,
            "train_time_s": sum(record["seconds"] for history in histories for record in history)}


def check_weight_patterns(model_name: str, prune: PruneSettings) -> None:
    """`prune`'s weight patterns and floors against `model_name`'s layers, before any work
    (`pruning.check_selection` on a model built on the meta device: names and shapes only)."""
    with torch.device("meta"):
        model = model_spec(model_name).build()
    pruning.check_selection(model, [prune.sparsity], pruning.pruning_method(prune.method).scope == "global",
                            prune.include, prune.exclude, prune.min_density,
                            prune.layer_sparsity if prune.method == "admm-layerwise" else None)


def admm_lr_spans(prune: PruneSettings) -> tuple[tuple[float, float] | None, tuple[float, float]]:
    """The parts of a cosine decay that ADMM's phase and its retraining cover (None: constant LR)."""
    if prune.admm_lr == "shared":
        cut = prune.admm_epochs / prune.total_epochs
        return (0.0, cut), (cut, 1.0)
    return (None if prune.admm_lr == "constant" else (0.0, 1.0)), (0.0, 1.0)


def count_mask_violations(model: nn.Module, masks: Any) -> int:
    """Number of nonzero weights at positions `masks` prunes (0 when masked retraining held)."""
    params = pruning.prunable_parameters(model)
    return sum(int(torch.count_nonzero(params[name].detach()[~mask.to(params[name].device)]))
               for name, mask in masks.items())


def settings_dict(settings: TrainSettings) -> dict[str, Any]:
    """`settings` as JSON-able values."""
    return {key: str(value) if isinstance(value, os.PathLike) else value for key, value in asdict(settings).items()}


# ---------------------------------------------------------------------------------- outputs
def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Atomically save `model.state_dict()` (CPU tensors) to `path`."""
    return atomic_torch_save({key: value.cpu() for key, value in model.state_dict().items()}, path)


def save_prune_plots(result: Mapping[str, Any], json_path: str | os.PathLike) -> list[Path]:
    """PNGs beside `json_path`: `<stem>.layers.png` (kept fraction per layer against depth) and,
    for ADMM, `<stem>.admm.png` (primal and dual residuals per ADMM iteration); the stem is the
    file name without `.json` (`lenet5-0.99` stays whole)."""
    json_path = Path(json_path)
    stem = json_path.name.removesuffix(".json")
    title = f"{result['model']} {result['method']}: {100 * result['sparsity']:.2f}% removed"
    paths = [pruning.save_kept_fraction_plot(result["layers"], json_path.parent / f"{stem}.layers.png", title)]
    if result["admm_updates"]:
        paths.append(save_residual_plot(result["admm_updates"], json_path.parent / f"{stem}.admm.png"))
    return paths


def save_residual_plot(updates: list[Mapping[str, float]], path: Path) -> Path:
    """Log-scale primal ||W - Z|| and dual rho ||Z - Z_prev|| per ADMM iteration, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    iterations = [update["iteration"] for update in updates]
    axes.semilogy(iterations, [max(u["primal_residual"], 1e-12) for u in updates], "o-", label="primal ||W - Z||")
    axes.semilogy(iterations, [max(u["dual_residual"], 1e-12) for u in updates], "s-", label="dual rho ||dZ||")
    axes.set_xticks(iterations)
    axes.set_xlabel("ADMM iteration")
    axes.set_ylabel("residual")
    axes.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return atomic_write_bytes(path, png.getvalue())
