"""`yolo-admm detect train`: train or fine-tune a Darknet detector.

    yolo-admm detect train --cfg C [--weights W] --data data.yaml --epochs 10 --out runs/train
    yolo-admm detect train --cfg C --weights W --images DIR --annotations train.json \\
        [--val-images DIR --val-annotations val.json] --epochs 10 --out runs/train
    yolo-admm detect train --cfg C --data data.yaml --epochs 20 --out runs/train --resume runs/train

Optimiser, schedule and augmentation default to the cfg's [net] (see `detector.train`); the flags
override them. Writes to --out: a checkpoint per epoch (`epoch_NNNN.pt`, what --resume takes; the
two newest are kept), `history.csv`, `args.json`, and the trained model as Darknet `.weights`
(`<cfg name>.weights`; the EMA weights when EMA is on; the header's version that of --weights, its
`seen` the optimizer steps taken times the cfg's [net] batch, as Darknet counts after `-clear`, so
that Darknet continuing from the file takes up the LR schedule where this run left it) with the
training data's class names beside it (`<cfg name>.names`, one per line, as Darknet reads them;
left out, with a warning at the start, when a name cannot be such a line). Two COCO jsons must list
the same categories.

Running the same command again (after Ctrl-C, say) resumes from the newest checkpoint in --out;
--out holding the checkpoints of a run with other settings is an error, never overwritten.
Settings that may change on such a resume: those in `RESUMABLE_FLAGS`. An explicit --resume
continues from that checkpoint with the flags given now: --lr, --momentum and --weight-decay, when
given, replace the checkpoint's (the LR schedule's position carries on); other settings than its
run recorded (args.json beside the checkpoint) are refused there too, --weights aside.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import detector
import pruning
from data.sources import DetectionSource, load_coco_json, load_yolo_dataset, read_data_yaml
from detector.class_checks import check_same_classes
from detector.cli import network_size
from detector.export import check_class_names, write_class_names
from detector.loading import load_to_train
from detector.train import DetectTrainConfig, check_training_options, fit_detector
from detector.weights import WeightsHeader
from engine import (atomic_write_json, changed_settings, describe_changes, distributed, find_latest_checkpoint,
                    output_folder, refuse_overwriting_inputs, resolved_paths, run_folder_lock, seed_everything)
from yolo_admm.wording import counted

RESUMABLE_FLAGS = {"epochs", "workers", "device", "eval_every", "resume", "progress",
                   "out"}                                 # a run folder copied or moved resumes where it is
EXPLICIT_RESUME_FLAGS = {"lr", "momentum", "weight_decay",     # what an explicit --resume may change besides
                         "weights"}                             # (the checkpoint holds the model)
PATH_FLAGS = {"cfg", "weights", "data", "images", "annotations", "val_images", "val_annotations", "out"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", required=True, help="Darknet .cfg file")
    parser.add_argument("--weights", help="Darknet .weights to start from, also of the first layers only (darknet "
                        "partial's yolov4.conv.137), or a compact archive of the same cfg (default: random "
                        "initialisation)")
    dataset = parser.add_argument_group("dataset (--data, or --images with --annotations)")
    dataset.add_argument("--data", help="Ultralytics data.yaml: trains on 'train', validates on 'val' if present")
    dataset.add_argument("--images", help="training images folder of a COCO json")
    dataset.add_argument("--annotations", help="training COCO instances json")
    dataset.add_argument("--val-images", help="validation images folder of a COCO json")
    dataset.add_argument("--val-annotations", help="validation COCO instances json")
    run = parser.add_argument_group("run")
    run.add_argument("--epochs", type=int, default=10, help="epochs to train (in total, when resuming; default 10)")
    run.add_argument("--batch-size", type=int, help="images per forward pass (default: [net] batch/subdivisions)")
    run.add_argument("--accumulate", type=int,
                     help="forward passes per optimizer step (default: [net] batch / batch size)")
    run.add_argument("--img-size", type=network_size, metavar="N",
                     help="input N x N (default: [net] width, which must equal its height)")
    run.add_argument("--lr", type=float, help="learning rate (default: [net] learning_rate)")
    run.add_argument("--momentum", type=float, help="SGD momentum (default: [net] momentum)")
    run.add_argument("--weight-decay", type=float, help="weight decay on conv weights (default: [net] decay)")
    run.add_argument("--burn-in", type=int, help="warm-up optimizer steps (default: [net] burn_in)")
    run.add_argument("--no-augment", action="store_true",
                     help="no augmentation: no colour, flip, jitter, resize nor mosaic (multi-scale is apart)")
    run.add_argument("--mosaic", type=float, help="mosaic probability (default: 0.5 if [net] mosaic=1, else 0)")
    run.add_argument("--multi-scale", action=argparse.BooleanOptionalAction, default=None,
                     help="a random input side per batch, /1.4..x1.4 (default: on when the cfg's last [yolo] "
                          "sets random, which also sets the range when it is not 1)")
    run.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                     help="EMA of the weights (default: on when [net] ema_alpha > 0)")
    run.add_argument("--eval-every", type=int, default=1, help="validation mAP every N epochs (0: never; default 1)")
    run.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                     help="DataLoader workers (default: 2, or the CPU count when smaller)")
    run.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    run.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, history, .weights)")
    run.add_argument("--resume", help="checkpoint file, or a folder meaning its newest checkpoint")


def load_sources(args: argparse.Namespace) -> tuple[DetectionSource, DetectionSource | None]:
    """(train source, validation source or None) from --data or the COCO json flags."""
    coco_flags = (args.images, args.annotations, args.val_images, args.val_annotations)
    if args.data and any(coco_flags):
        raise ValueError("give either --data, or --images with --annotations, not both")
    if args.data:
        train = load_yolo_dataset(args.data, "train")  # checks the yaml
        has_val = read_data_yaml(Path(args.data)).get("val") is not None
        return train, load_yolo_dataset(args.data, "val") if has_val else None
    if not (args.images and args.annotations):
        raise ValueError("a dataset is needed: --data data.yaml, or --images DIR --annotations train.json")
    if bool(args.val_images) != bool(args.val_annotations):
        raise ValueError("--val-images and --val-annotations go together")
    val = load_coco_json(args.val_images, args.val_annotations) if args.val_images else None
    train = load_coco_json(args.images, args.annotations)
    check_same_classes(train.class_names, args.annotations, val and val.class_names, str(args.val_annotations))
    return train, val


def train_config(args: argparse.Namespace) -> DetectTrainConfig:
    """The `DetectTrainConfig` of the parsed flags (checked)."""
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--accumulate": args.accumulate}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, found {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, found {args.lr}")
    if args.mosaic is not None and not 0 <= args.mosaic <= 1:
        raise ValueError(f"--mosaic must be a probability in [0, 1], found {args.mosaic}")
    if args.momentum is not None and not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), found {args.momentum}")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a finite number >= 0, found {args.weight_decay}")
    for flag, value in {"--workers": args.workers, "--eval-every": args.eval_every, "--burn-in": args.burn_in}.items():
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0, found {value}")
    return DetectTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, accumulate=args.accumulate, img_size=args.img_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, burn_in=args.burn_in,
        augment=not args.no_augment, mosaic=args.mosaic, multi_scale=args.multi_scale, ema=args.ema,
        eval_every=args.eval_every, workers=args.workers, device=args.device, amp=not args.no_amp,
        out_dir=args.out, resume=args.resume, progress=args.progress)


def run(args: argparse.Namespace) -> int:
    try:
        config = train_config(args)
    except ValueError as error:               # every rank reads the same flags: said once
        raise distributed.EveryRankError(str(error)) from None
    config.device = str(distributed.init_from_env(config.device))  # joins torchrun's group, if any
    with distributed.checked_on_every_rank():       # bad input: said once, not by every rank
        check_training_options(detector.parse_cfg(args.cfg), config.img_size, config.augment, config.multi_scale)
        inputs = {"--cfg": args.cfg, "--weights": args.weights, "--data": args.data,
                  "--annotations": args.annotations, "--val-annotations": args.val_annotations}
        refuse_overwriting_inputs(written_files(args), inputs, f"--out {args.out}")
        output_folder(args.out, "--out")            # on every rank, so that every rank stops on a bad one
    with run_folder_lock(args.out, "--out"):        # one job per folder
        return train_in_folder(args, config)


def written_files(args: argparse.Namespace) -> list[Path]:
    """The files of fixed names a run writes into --out (the trained .weights and .names among them)."""
    stem = Path(args.cfg).stem
    return [args.out / name for name in (f"{stem}.weights", f"{stem}.names", "args.json", "history.csv")]


def train_in_folder(args: argparse.Namespace, config: DetectTrainConfig) -> int:
    """Train (or resume) into --out, which this job holds; rank 0 writes the weights and prints."""
    config.resume = resume_point(args)
    with distributed.checked_on_every_rank():
        train_source, val_source = load_sources(args)
        data_name = str(args.data or args.annotations)  # where the class names come from, for messages
        class_names = writable_class_names(train_source, data_name)
        model = load_to_train(args.cfg, args.weights, partial=True)
    zero = pruning.weight_sparsity(model)
    if zero > pruning.PRUNED_ZERO_FRACTION:
        warnings.warn(f"--weights {args.weights}: {100 * zero:.1f}% of its conv weights are zero (a pruned model?); "
                      f"detect train does not keep them at zero, so the model it writes is dense again",
                      stacklevel=2)
    if distributed.is_main():
        atomic_write_json(args.out / "args.json", recorded_args(args))
    seed_everything(args.seed)
    if distributed.is_main():
        print(f"train: {counted(len(train_source.records), 'image')}, validation: "
              f"{counted(len(val_source.records), 'image') if val_source else 'none'}; out: {args.out}")
    trainer = fit_detector(model, train_source, val_source, config)
    trained = trainer.ema.module if trainer.ema is not None else trainer.model
    weights_path = args.out / f"{Path(args.cfg).stem}.weights"
    if not distributed.is_main():
        return 0
    detector.write_weights(weights_path, trained, trained_header(model.weights_header, trainer.step, model.net.batch))
    names_path = write_class_names(weights_path.with_suffix(".names"), class_names, data_name) if class_names else None
    last = trainer.history[-1] if trainer.history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("train/loss", "eval/map50")))
    print(f"done: {counted(trainer.epoch, 'epoch')}, {counted(trainer.step, 'step')}; {summary}")
    print(f"weights: {weights_path}; " + (f"class names: {names_path}; " if names_path else "")
          + f"checkpoint: {trainer.last_checkpoint}")
    return 0


def trained_header(source: WeightsHeader | None, steps: int, batch: int) -> WeightsHeader:
    """The `.weights` header of a trained model: the version of the file it started from (Darknet
    0.2.5's without one), `seen` as Darknet counts it from a `-clear` start (`steps` x `batch`)."""
    return replace(source or WeightsHeader(), seen=steps * batch)


def writable_class_names(source: DetectionSource, data_name: str) -> list[str] | None:
    """The training data's class names, or None (with a warning, before any training) when one of
    them cannot be a line of a .names file."""
    try:
        check_class_names(source.class_names, data_name)
    except ValueError as err:
        warnings.warn(f"{err}; no .names file will be written beside the weights", stacklevel=2)
        return None
    return list(source.class_names)


def recorded_args(args: argparse.Namespace) -> dict:
    """The flags as written to args.json (paths absolute, the dispatcher's callables left out), and
    the number of processes, which sets the optimizer steps per epoch."""
    flags = {key: str(value) if isinstance(value, Path) else value
             for key, value in vars(args).items() if not callable(value)}
    return {**resolved_paths(flags, PATH_FLAGS), "processes": distributed.world_size()}


def resume_point(args: argparse.Namespace) -> str | None:
    """--resume, else --out when it already holds checkpoints of a run with the same settings
    (so the same command resumes an interrupted run), else None. Under torchrun, what rank 0 finds
    decides for every rank.

    Raises:
        EveryRankError (a ValueError, said once): --out holds checkpoints of a run with other
            settings, or --resume continues a run with settings an explicit resume may not change.
    """
    if args.resume:
        distributed.raise_on_every_rank(explicit_resume_problem(args))
        return args.resume
    latest = distributed.broadcast_object(find_latest_checkpoint(args.out))
    if latest is None:
        return None
    changed = changed_settings(recorded_settings(args.out) or {"processes": 1}, recorded_args(args),
                               ignore=RESUMABLE_FLAGS)
    problem = None
    if changed:
        on_purpose = all(name in EXPLICIT_RESUME_FLAGS for name, _, _ in changed)
        problem = (f"--out {args.out}: expected a new folder or one of a run with the same settings, found the "
                   f"checkpoints ({latest.name}) of a run with other settings ({describe_changes(changed, True)}); "
                   f"choose another --out" + (f", or continue that run with --resume {args.out}" if on_purpose else ""))
    distributed.raise_on_every_rank(problem)
    if distributed.is_main():
        print(f"resuming from {latest} (this command already ran in --out {args.out})")
    return str(args.out)


def explicit_resume_problem(args: argparse.Namespace) -> str | None:
    """What is wrong when the run --resume continues (the args.json beside its checkpoint, where
    there is one) had other settings than these flags, beyond `RESUMABLE_FLAGS` and
    `EXPLICIT_RESUME_FLAGS`: another dataset, batch, input size or number of processes would
    continue another run; or nothing is there. None when nothing is wrong."""
    resume = Path(args.resume)
    if not resume.exists():                           # before the data is read, not after
        return f"--resume {args.resume}: expected a checkpoint file or a folder of them, found nothing"
    saved = recorded_settings(resume if resume.is_dir() else resume.parent)
    changed = [] if saved is None else changed_settings(saved, recorded_args(args),
                                                        ignore=RESUMABLE_FLAGS | EXPLICIT_RESUME_FLAGS)
    if not changed:
        return None
    found = f"--resume {args.resume}: its run had other settings ({describe_changes(changed, True)}); "
    if [name for name, _, _ in changed] == ["processes"]:
        return found + "resume it with as many processes as it ran with (they set its optimizer steps)"
    return found + (f"an explicit resume may change --lr, --momentum and --weight-decay besides what a rerun may; "
                    f"to train on with other settings, start a new run from its weights (detect export "
                    f"--checkpoint {args.resume} --formats darknet --out DIR, then --weights DIR/model.weights)")


def recorded_settings(folder: Path) -> dict | None:
    """The settings a `detect train` run recorded in `folder`/args.json (paths resolved; runs from
    before the process count was recorded ran one), or None where there is no such file."""
    path = folder / "args.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: unreadable run record ({err}); expected the args.json detect train "
                         f"writes") from None
    return {"processes": 1, **resolved_paths(saved, PATH_FLAGS)}


def interrupted_hint(args: argparse.Namespace) -> str:
    """What an interrupted `detect train` kept, and how to go on."""
    latest = find_latest_checkpoint(args.out)
    if latest is None:
        return f"no epoch had finished, so {args.out} holds no checkpoint yet"
    again = ("run the same command again to resume" if args.resume in (None, str(args.out))
             else f"resume with --resume {args.out}")
    return f"the checkpoints so far are kept in {args.out} (newest: {latest.name}); {again}"



