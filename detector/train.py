"""Train a Darknet detector on the shared engine, with the optimiser and schedule of its `[net]`.

- Optimiser: SGD with `momentum`; weight decay `decay` on conv weights only (not on BatchNorm or
  biases), as Darknet decays only `weights`.
- Learning rate per optimizer step n (Darknet's iteration, counted from 1): `learning_rate` x
  (n / burn_in)^power during burn-in (power from `[net] power`, default 4), then the `policy`:
  constant, steps (times `scales[i]` once n reaches `steps[i]`), step, exp or poly.
- Batches: `batch_size` images per forward pass, gradients averaged over `accumulate` passes (the
  part of Darknet's subdivisions); by default the cfg's batch / subdivisions and subdivisions.
  The loss is per image (see `detector.loss`), so the cfg's learning rate means what it meant.
- Several processes (`torchrun --nproc_per_node=N`, see `engine.distributed`): each rank reads its
  1/N share of the images through a `DistributedSampler`, `batch_size` is per process (by default
  batch / subdivisions, or batch / N when N of those would exceed batch), and the default
  `accumulate` becomes batch / (batch_size x N), so one optimizer step still sees the cfg's `batch`
  images in total (`default_batching`).

`build_detector_trainer(model, train_source, val_source, config, callbacks)` returns an
`engine.Trainer` (the prune pipeline adds its callbacks and calls `fit` itself);
`fit_detector(...)` builds one and trains it.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from data.augment import AugmentConfig, crop_problems
from data.eval_dataset import InferenceDataset
from data.sources import DetectionSource
from data.seeded_batches import SeededBatchSampler
from data.train_dataset import DetectionTrainDataset, collate_detection, multi_scale_sizes
from detector.cfg import (LAYER_TRAINING_FLAGS, LAYER_WEIGHT_OPTIONS, ConvolutionalSection, DarknetCfg, YoloSection,
                          check_rgb_input)
from detector.class_checks import check_classes
from detector.evaluate import evaluate
from detector.loss import YoloLoss
from detector.predict import make_loader
from engine import Trainer, TrainConfig, distributed, resolve_device

DEFAULT_BURN_IN_POWER = 4.0
DARKNET_MULTI_SCALE = 1.4      # Darknet's resize factor for random=1, either way
MAX_MULTI_SCALE = 2.0          # a larger random factor is refused
POLICIES = ("constant", "steps", "step", "exp", "poly")
UNAPPLIED_NET_OPTIONS = ("adam", "blur", "gaussian_noise", "mixup", "cutmix")   # Darknet trains with them; we do not
DECAYED_GROUP = 0             # build_optimizer's parameter group of the conv weights, the ones with weight decay


@dataclass
class DetectTrainConfig:
    """Settings of a detector training run; None means "from the cfg's [net]".

    Attributes:
        epochs: passes over the training images.
        batch_size: images per forward pass (default: batch / subdivisions).
        accumulate: forward passes per optimizer step (default: batch / batch_size).
        img_size: square input side, a multiple of 32 (default: [net] width).
        lr, momentum, weight_decay, burn_in: override [net] learning_rate, momentum, decay, burn_in.
        augment: colour / flip / jitter augmentation (False: resize or letterbox only); the jitter
            and resize come from the cfg's last [yolo], as Darknet reads them from its last layer.
        mosaic: mosaic probability (default: 0.5 when [net] mosaic=1, else 0).
        multi_scale: draw each batch's side from img_size / c .. img_size * c (multiples of 32,
            uniformly), c = 1.4 (default: on when the last [yolo] sets random; random=c with c != 1
            sets c, as in Darknet, which draws a side every 10 iterations where this draws one per
            batch, and draws a factor and rounds the side up: see `data.multi_scale_sizes`).
        ema: keep an EMA of the weights (default: when [net] ema_alpha > 0); ema_decay likewise.
        eval_every: validation mAP every this many epochs (0: never).
        workers: DataLoader worker processes (per process under torchrun).
        device, amp, out_dir (checkpoints + history.csv), resume, progress: as `engine.TrainConfig`.
    """

    epochs: int = 10
    batch_size: int | None = None
    accumulate: int | None = None
    img_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    burn_in: int | None = None
    augment: bool = True
    mosaic: float | None = None
    multi_scale: bool | None = None
    ema: bool | None = None
    ema_decay: float | None = None
    eval_every: int = 1
    eval_batch_size: int = 8
    workers: int = 0
    device: str | None = None
    amp: bool = True
    out_dir: str | os.PathLike | None = None
    resume: str | os.PathLike | None = None
    progress: bool = True


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with weight decay on the conv weights (parameters with >1 dimension) only."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": weight_decay},             # DECAYED_GROUP
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def darknet_lr_factor(iteration: int, net, burn_in: int) -> float:
    """Darknet's `get_current_rate` / learning_rate at optimizer step `iteration` (from 1).

    Raises:
        ValueError: a `policy` other than constant, steps, step, exp, poly.
    """
    power = float(net.options.get("power", DEFAULT_BURN_IN_POWER))
    if iteration < burn_in:
        return (iteration / burn_in) ** power
    policy = net.policy
    if policy == "constant":
        return 1.0
    if policy == "steps":
        factor = 1.0
        for step, scale in zip(net.steps, net.scales):
            if step > iteration:
                break
            factor *= scale
        return factor
    if policy == "step":
        return float(net.options.get("scale", 1.0)) ** (iteration // int(net.options.get("step", 1)))
    if policy == "exp":
        return float(net.options.get("gamma", 1.0)) ** iteration
    check_lr_policy(net)
    return max(0.0, 1.0 - iteration / max(net.max_batches, 1)) ** power        # poly


def check_lr_policy(net) -> None:
    """ValueError naming the cfg's line when its [net] policy is one training does not follow."""
    if net.policy not in POLICIES:
        raise ValueError(f"{net.source.of('policy')}: policy={net.policy} is not supported for training; "
                         f"expected one of {', '.join(POLICIES)}")


def darknet_scheduler(optimizer: torch.optim.Optimizer, net, burn_in: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step that follows `darknet_lr_factor`."""
    check_lr_policy(net)  # now, not mid-run
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_factor_after, net=net, burn_in=burn_in))


def _factor_after(steps_taken: int, net, burn_in: int) -> float:
    return darknet_lr_factor(steps_taken + 1, net, burn_in)


class DetectionLoss:
    """`loss_fn(model, (images, targets)) -> (loss, logs)` for `engine.Trainer`."""

    def __init__(self, heads):
        self.yolo_loss = YoloLoss(heads)

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        images, targets = batch
        return self.yolo_loss(model(images), targets, (images.shape[-2], images.shape[-1]))


class ValidationMap:
    """`evaluate(model) -> {"map50", "map50_95", ...}` on a validation source (for `engine.Trainer`),
    run on `device` wherever the model is."""

    def __init__(self, source: DetectionSource, size: int, letterbox: bool, batch_size: int,
                 workers: int, device: torch.device):
        self.source = source
        self.device = device
        dataset = InferenceDataset.from_source(source, size, size, letterbox)
        self.loader = make_loader(dataset, batch_size, workers, device)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.loader, self.source, progress=False, device=self.device).metrics()


def build_detector_trainer(model: nn.Module, train_source: DetectionSource,
                           val_source: DetectionSource | None, config: DetectTrainConfig,
                           callbacks: list | None = None) -> Trainer:
    """An `engine.Trainer` that trains `model` (a `detector.DarknetModel`) on `train_source`.

    Raises:
        ValueError: the dataset's classes do not match the model's, or a setting is invalid.
    """
    net = model.net
    device = distributed.init_from_env(resolve_device(config.device))  # joins torchrun's group, if any
    with distributed.checked_on_every_rank():                          # said once, not by every rank
        check_classes(model.cfg.path, int(model.heads[0].num_classes), train_source, val_source)
    size = training_side(model.cfg, config.img_size)
    batch_size, accumulate = default_batching(net.batch, net.subdivisions, distributed.world_size(),
                                              config.batch_size, config.accumulate)
    augment = darknet_augmentation(model.cfg, size, config.mosaic, config.augment)
    dataset = DetectionTrainDataset(train_source, augment, augment=config.augment)
    order = distributed.distributed_sampler(dataset, shuffle=True) if distributed.is_distributed() \
        else RandomSampler(dataset)
    sides = multi_scale_sides(model.cfg, size, config.multi_scale)
    batches = SeededBatchSampler(order, batch_size, sides=sides, stream=distributed.rank())
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.workers, collate_fn=collate_detection,
                        pin_memory=device.type == "cuda")
    optimizer = build_optimizer(model, _pick(config.lr, net.learning_rate), _pick(config.momentum, net.momentum),
                                _pick(config.weight_decay, net.decay))
    burn_in = int(_pick(config.burn_in, net.burn_in))
    _warn_of_layer_training_options(model.cfg)
    _warn_of_net_training_options(model.net)
    if net.batch == 1 and config.batch_size is None and config.accumulate is None:
        warnings.warn(f"{net.source.of('batch')}: [net] batch=1, the testing setting many Darknet cfgs leave active "
                      f"(their training batch commented out below it?): each optimizer step sees one image; set "
                      f"the cfg's training batch and subdivisions (or, in detect train, --batch-size and "
                      f"--accumulate)", stacklevel=3)
    if config.accumulate is None:
        _warn_of_another_step_batch(net, batch_size, accumulate, distributed.world_size())
    _warn_of_a_burn_in_longer_than_the_run(
        "the given burn_in" if config.burn_in is not None else net.source.of("burn_in"), burn_in, model.net,
        config.epochs * math.ceil(len(batches) / accumulate), _pick(config.lr, net.learning_rate))
    use_ema = bool(net.ema_alpha > 0) if config.ema is None else config.ema
    ema_decay = _pick(config.ema_decay, net.ema_alpha if net.ema_alpha > 0 else 0.9999)
    train_config = TrainConfig(
        epochs=config.epochs, device=str(device), amp=config.amp, accumulate=accumulate, ema=use_ema,
        ema_decay=ema_decay, checkpoint_dir=config.out_dir, resume=config.resume,
        log_csv=None if config.out_dir is None else os.path.join(config.out_dir, "history.csv"),
        eval_every=config.eval_every, scheduler_interval="step", progress=config.progress, desc="detect train")
    evaluator = None
    if val_source is not None and config.eval_every > 0:
        evaluator = ValidationMap(val_source, size, augment.letterbox, config.eval_batch_size, config.workers, device)
    callbacks = [*(callbacks or []), GivenHyperparameters(config.lr, config.momentum, config.weight_decay)]
    return Trainer(model, optimizer, DetectionLoss(model.heads), loader, train_config, callbacks=callbacks,
                   scheduler=darknet_scheduler(optimizer, net, burn_in), evaluate=evaluator)


def check_training_options(cfg: DarknetCfg, size: int | None, augment: bool, multi_scale: bool | None) -> None:
    """What the input size and the last [yolo]'s jitter, resize and random can refuse, before any
    work (see `training_side`, `darknet_augmentation` and `multi_scale_sides`), input of other
    than 3 channels (`check_rgb_input`) and a learning-rate policy training does not follow."""
    check_rgb_input(cfg.net)
    check_lr_policy(cfg.net)
    side = training_side(cfg, size)
    darknet_augmentation(cfg, side, augment=augment)
    multi_scale_sides(cfg, side, multi_scale)


def training_side(cfg: DarknetCfg, size: int | None) -> int:
    """The side of the square inputs training uses: `size`, else the cfg's [net] width, which must
    then equal its height (a non-square cfg would otherwise train, evaluate and export square without
    a word)."""
    if size is None and cfg.net.width != cfg.net.height:
        raise ValueError(f"{cfg.net.source.of('height')}: expected a square [net] (training uses square inputs), "
                         f"found width={cfg.net.width} height={cfg.net.height}; choose the side with --img-size, "
                         f"which the exports then take too")
    return int(size or cfg.net.width)


def darknet_augmentation(cfg: DarknetCfg, size: int, mosaic: float | None = None,
                         augment: bool = True) -> AugmentConfig:
    """The training augmentation of a cfg: colour, flip, mosaic and letter_box from [net], jitter and
    resize from the last [yolo] (Darknet reads them from its last layer); `mosaic` overrides [net].
    Without `augment` only the size and letter_box count, and the last [yolo] is not read.

    Raises:
        ValueError: a resize <= 0, or a jitter and resize whose crop can take a whole image away,
            naming the cfg's file and the option's line.
    """
    overrides = {} if mosaic is None else {"mosaic": mosaic}
    if not augment:
        return AugmentConfig.from_net(cfg.net, size, **overrides)
    section = _last_yolo(cfg)
    jitter, resize = float(section.loss_options["jitter"]), float(section.loss_options["resize"])
    problems = crop_problems(jitter, resize)                       # AugmentConfig's own check, with the line
    if problems:
        blamed = "jitter" if resize > 0 else "resize"              # the option crop_problems names first
        raise ValueError(f"{section.source.of(blamed)}: {'; '.join(problems)}")
    return AugmentConfig.from_net(cfg.net, size, jitter=jitter, resize=resize, **overrides)


def _last_yolo(cfg: DarknetCfg) -> YoloSection:
    return [section for section in cfg.layers if isinstance(section, YoloSection)][-1]


def multi_scale_sides(cfg: DarknetCfg, size: int, multi_scale: bool | None) -> list[int] | None:
    """The sides a batch draws from (None: always `size`), from the last [yolo]'s random unless
    `multi_scale` is True or False (`multi_scale_coefficient`).

    Raises:
        ValueError: a random it cannot use, naming the cfg's file and the option's line.
    """
    section = _last_yolo(cfg)
    try:
        coefficient = multi_scale_coefficient(float(section.loss_options["random"]), multi_scale)
    except ValueError as err:
        raise ValueError(f"{section.source.of('random')}: {err}") from None
    return None if coefficient is None else multi_scale_sizes(size, coefficient)


def multi_scale_coefficient(random: float, multi_scale: bool | None) -> float | None:
    """c for sides in [size / c, size * c], or None for one size. Darknet resizes when the last
    [yolo]'s random is not 0: by up to 1.4x either way for random=1, by up to random (or 1 / random)
    otherwise. `multi_scale` True or False overrides the cfg; True with random=0 uses 1.4."""
    if not (random != 0 if multi_scale is None else multi_scale):
        return None
    if random in (0.0, 1.0):
        return DARKNET_MULTI_SCALE
    if not (random > 0 and max(random, 1 / random) <= MAX_MULTI_SCALE):
        raise ValueError(f"random={random:g}: expected 0 (one input size), 1 (sizes from / {DARKNET_MULTI_SCALE:g} "
                         f"to x {DARKNET_MULTI_SCALE:g}) or a factor c within [{1 / MAX_MULTI_SCALE:g}, "
                         f"{MAX_MULTI_SCALE:g}] (sizes from / c to x c)")
    return max(random, 1 / random)


def _warn_of_layer_training_options(cfg: DarknetCfg) -> None:
    """A transfer-learning cfg's `stopbackward=1` or per-layer `learning_rate` would freeze or damp
    layers in Darknet; this trainer trains every layer at the [net] rate: say so, naming them."""
    found = []
    for section in cfg.layers:
        for key, value in section.training.items():
            changes = int(value) != 0 if key in LAYER_TRAINING_FLAGS else (
                isinstance(section, ConvolutionalSection) and value != LAYER_WEIGHT_OPTIONS[key])
            if changes:
                found.append(f"{section.source.of(key)}: {key}={value:.12g}")
    if found:
        warnings.warn(f"{len(found)} per-layer training option(s) of the cfg are not applied: every layer trains, "
                      f"at the [net] learning rate ({'; '.join(found[:3])}{'; ...' if len(found) > 3 else ''})",
                      stacklevel=3)


def _warn_of_net_training_options(net) -> None:
    """[net] options Darknet trains with that this trainer does not apply (the Adam optimizer, and
    the blur, Gaussian-noise, mixup and cutmix augmentations): say so, naming their lines."""
    found = [f"{net.source.of(key)}: {key}={net.source.written(key)}" for key in UNAPPLIED_NET_OPTIONS
             if net.source.written(key) is not None and _number_or_none(net.source.written(key)) != 0]
    if found:
        warnings.warn(f"{len(found)} [net] training option(s) of the cfg are not applied: this trainer uses SGD "
                      f"and Darknet's colour, flip, jitter, resize and mosaic augmentation only "
                      f"({'; '.join(found[:3])}{'; ...' if len(found) > 3 else ''})", stacklevel=3)


def _number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _warn_of_another_step_batch(net, batch_size: int, accumulate: int, processes: int) -> None:
    """Gradient accumulation makes an optimizer step see the cfg's `batch` images where the batch per
    pass and process allows; where it does not (a --batch-size x processes above the cfg's batch,
    or not dividing it), the cfg's schedule in steps spans other numbers of images: say so."""
    seen = batch_size * accumulate * processes
    if net.batch <= 1 or seen == net.batch:
        return
    advice = (f"a --batch-size that divides {net.batch // processes} keeps the cfg's batch"
              if net.batch % processes == 0 else
              f"{processes} processes cannot share it evenly: a number of processes that divides it can")
    warnings.warn(f"{net.source.of('batch')}: an optimizer step sees {seen} images ({batch_size} per pass x "
                  f"{accumulate} pass{'es' * (accumulate != 1)} x {processes} process{'es' * (processes != 1)}), "
                  f"not the cfg's batch={net.batch}, so its schedule in steps (burn_in, steps, max_batches) spans "
                  f"{seen / net.batch:.3g}x the images; {advice}", stacklevel=3)


def _warn_of_a_burn_in_longer_than_the_run(where: str, burn_in: int, net, steps: int, lr: float) -> None:
    """A fine-tuning run of a cfg written for training from scratch (yolo-fastest's burn_in=4000)
    would otherwise learn nothing, silently: the LR ramps as (step / burn_in)^power. `where` names
    the burn_in: its cfg line, or the setting that replaced it."""
    if burn_in > steps > 0:
        peak = lr * darknet_lr_factor(steps, net, burn_in)
        warnings.warn(f"{where}: burn_in={burn_in} is longer than this run's {steps} optimizer steps, "
                      f"so the learning rate never exceeds {peak:.2g}; set --burn-in (0 to start at the full rate)",
                      stacklevel=3)


class GivenHyperparameters:
    """Trainer callback: the learning rate, momentum and weight decay given in the config (not None)
    hold after a resume too. A checkpoint's optimizer and scheduler state would otherwise bring back
    the old ones; the schedule's position (burn-in, steps) carries on. On a fresh run a no-op."""

    def __init__(self, lr: float | None, momentum: float | None, weight_decay: float | None):
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def on_train_start(self, trainer: Trainer) -> None:
        groups, scheduler = trainer.optimizer.param_groups, trainer.scheduler
        if self.lr is not None:
            scheduler.base_lrs = [self.lr] * len(groups)
            for group, factor in zip(groups, scheduler.lr_lambdas):
                group["initial_lr"] = self.lr
                group["lr"] = self.lr * factor(scheduler.last_epoch)
        for group in groups:
            if self.momentum is not None:
                group["momentum"] = self.momentum
        if self.weight_decay is not None:
            groups[DECAYED_GROUP]["weight_decay"] = self.weight_decay   # conv weights only (a decay of 0 too)


def fit_detector(model: nn.Module, train_source: DetectionSource, val_source: DetectionSource | None,
                 config: DetectTrainConfig, callbacks: list | None = None) -> Trainer:
    """Train `model` for `config.epochs` epochs (see `build_detector_trainer`); returns the trainer
    (its `history` holds the per-epoch losses and validation metrics)."""
    trainer = build_detector_trainer(model, train_source, val_source, config, callbacks)
    trainer.fit()
    return trainer


def _pick(override, default):
    return default if override is None else override


def default_batching(batch: int, subdivisions: int, processes: int, batch_size: int | None = None,
                     accumulate: int | None = None) -> tuple[int, int]:
    """(images per forward pass and process, forward passes per optimizer step) for a cfg's `batch`
    and `subdivisions` over `processes`, the given ones kept: one step sees `batch` images in all."""
    if batch_size is None:
        batch_size = max(batch // subdivisions, 1)
        if batch_size * processes > batch:
            batch_size = max(batch // processes, 1)
    if accumulate is None:
        accumulate = max(round(batch / (batch_size * processes)), 1)
    return int(batch_size), int(accumulate)
