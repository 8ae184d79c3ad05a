"""`yolo-admm classify MODE [options]`: train, evaluate and prune LeNet-5 / ResNet-56.

    yolo-admm classify train --model lenet5 --data ../shared/data/mnist --epochs 10 --out runs/lenet5.pt
    yolo-admm classify eval  --model resnet56 --data ../shared/data/cifar10 --weights resnet56-4bfd9763.th
    yolo-admm classify prune --model lenet5 --data ../shared/data/mnist --weights runs/lenet5.pt \\
        --sparsity 0.99 --method admm-global --admm-iters 4 --epochs-per-iter 1 --rho 1e-3 --rho-mult 2 \\
        --retrain-epochs 6 --json-out runs/lenet5-admm.json

Bad input gets a message naming what was wrong, without a traceback: an unknown model or a
sparsity outside [0, 1) is an argument error (argparse's usage line, then the error; exit 2);
missing data or weights raise FileNotFoundError / ValueError, which `yolo-admm` prints in one line.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from torch import nn

import pruning
from classify.pipeline import (ADMM_LR_SCHEDULES, METHODS, MODELS, OPTIMIZERS, PruneSettings, TrainSettings,
                               check_weight_patterns, evaluate_accuracy, make_eval_loader, model_spec, prepare,
                               prune_model, save_prune_plots, save_weights, train_model)
from classify.run_record import claim_checkpoint_dir, run_identity
from engine import (atomic_write_json, distributed, output_file, output_folder, refuse_overwriting_inputs,
                    resolve_device, run_folder_lock)
from yolo_admm.arguments import parse_arguments, pattern_list
from yolo_admm.wording import counted

DEFAULT_RUN_DIR = Path("runs/classify")


def sparsity_fraction(text: str) -> float:
    """argparse type of --sparsity: a float in [0, 1), the fraction of weights removed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), found {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction of weights removed), found {value}")
    return value


CHECKPOINT_EMA = "; a checkpoint of an --ema run gives its average, the weights that run evaluated"
WEIGHTS_HELP = {"train": "a state dict or checkpoint to start from (default: new weights)" + CHECKPOINT_EMA,
                "eval": "the state dict or checkpoint to evaluate" + CHECKPOINT_EMA,
                "prune": "the state dict or checkpoint to prune (the dense model)" + CHECKPOINT_EMA}
BATCH_HELP = {"train": "training batch (default: 128); evaluation takes batches of at least 256",
              "eval": "evaluation batch (at least 256)",
              "prune": "training batch (default: 128); evaluation takes batches of at least 256"}


def add_common_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """Options every mode takes: model, data, weights, batching, device, test subset, seed."""
    parser.add_argument("--model", required=True, choices=list(MODELS), help="classifier to use")
    parser.add_argument("--data", required=True, type=Path,
                        help="dataset directory: MNIST IDX .gz files (lenet5), "
                             "or CIFAR-10 train/ and test/ class folders (resnet56)")
    parser.add_argument("--weights", type=Path, default=None, required=mode in ("eval", "prune"),
                        help=WEIGHTS_HELP[mode])
    parser.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP[mode])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--eval-samples", type=int, default=None, metavar="N",
                        help="evaluate on a fixed seeded subset of N test images (default: all)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the modes that train: learning rate, epoch size, checkpoints, resume, outputs."""
    model_defaults = ", ".join(f"{spec.optimizer} for {name}" for name, spec in MODELS.items())
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                        help=f"adam, or sgd with Nesterov momentum 0.9; default: {model_defaults}")
    parser.add_argument("--lr", type=float, default=None,
                        help="default: " + ", ".join(f"{lr:g} with {name}" for name, lr in OPTIMIZERS.items()))
    parser.add_argument("--train-samples", type=int, default=None, metavar="N",
                        help="images drawn per training epoch (default: the whole train set)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="trainer checkpoints (one sub-folder per phase) and run.json; a folder holds one "
                             "run, so a new run refuses one with checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue each phase from its newest checkpoint in --checkpoint-dir (the same "
                             "settings only; --device, --workers, --eval-every, --no-progress, --out, "
                             "--json-out and --checkpoint-dir itself may change)")
    parser.add_argument("--eval-every", type=int, default=1, metavar="N",
                        help="test-set accuracy every N epochs (default 1; 0: only the final accuracies, which "
                             "is faster; N does not change the training)")
    parser.add_argument("--ema", type=float, default=None, metavar="DECAY",
                        help="keep an exponential moving average of the weights with this decay (e.g. 0.999) "
                             "in dense training and masked retraining (not in the ADMM phase); evaluations and "
                             "the final weights are the average's (default: off)")
    parser.add_argument("--ema-tau", type=float, default=2000.0, metavar="STEPS",
                        help="the average's warm-up: its decay after n optimizer steps is DECAY * (1 - exp(-n / "
                             "STEPS)) (default 2000; 0: none)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="write the result JSON, with the run's data, weights (and their SHA-256) and "
                             "settings as used under 'run' (prune also writes its plots beside it)")


ADMM_ONLY_DEFAULTS = {"rho": 1e-3, "rho_mult": 1.0, "rho_max": None, "admm_lr": "constant"}  # dest -> default


def warn_ignored_admm_options(args: argparse.Namespace) -> None:
    """Warn when ADMM's own options are set for a magnitude method, which ignores them (they are
    accepted, and recorded, so that one command line serves every method)."""
    if pruning.pruning_method(args.method).kind == "admm":
        return
    ignored = ["--" + dest.replace("_", "-") for dest, default in ADMM_ONLY_DEFAULTS.items()
               if getattr(args, dest) != default]
    if ignored:
        warnings.warn(f"{', '.join(ignored)}: ADMM settings, which {args.method} ignores", stacklevel=2)


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The pruning method and its schedule."""
    parser.add_argument("--sparsity", type=sparsity_fraction, required=True,
                        help="fraction of the prunable weights (those --include/--exclude select) removed, in "
                             "[0, 1); the result's measured sparsity counts every Conv/Linear weight")
    parser.add_argument("--method", choices=list(METHODS), default="admm-global", help="(default admm-global)")
    parser.add_argument("--include", type=pattern_list, metavar="PATTERNS", default=None,
                        help="parameter-name patterns that may be pruned, comma-separated globs or re:REGEX "
                             "(default: every Conv and Linear weight)")
    parser.add_argument("--exclude", type=pattern_list, metavar="PATTERNS", default=None,
                        help="parameter-name patterns never pruned, comma-separated globs or re:REGEX "
                             "(e.g. 'conv1.*,fc2.*')")
    parser.add_argument("--min-density", type=float, default=0.0,
                        help="keep at least this fraction of every layer (default 0)")
    parser.add_argument("--admm-iters", type=int, default=3, help="ADMM iterations (Z/U updates; default: 3)")
    parser.add_argument("--epochs-per-iter", type=int, default=1,
                        help="training epochs between ADMM updates (default: 1)")
    parser.add_argument("--rho", type=float, default=ADMM_ONLY_DEFAULTS["rho"],
                        help="initial ADMM penalty (default: 1e-3)")
    parser.add_argument("--rho-mult", type=float, default=ADMM_ONLY_DEFAULTS["rho_mult"],
                        help="rho multiplier after each ADMM iteration (default: 1)")
    parser.add_argument("--rho-max", type=float, default=ADMM_ONLY_DEFAULTS["rho_max"],
                        help="cap on rho (default: none but float32's largest value)")
    parser.add_argument("--admm-lr", choices=ADMM_LR_SCHEDULES, default=ADMM_ONLY_DEFAULTS["admm_lr"],
                        help="ADMM's learning rate: constant in the ADMM phase then a cosine decay over retraining "
                             "(default); cosine: a decay to zero over each phase; shared: one cosine decay over both "
                             "phases, as the magnitude methods have")
    parser.add_argument("--retrain-epochs", type=int, default=3,
                        help="masked retraining epochs after ADMM (default: 3; magnitude methods retrain for the ADMM "
                             "epochs too)")
    parser.add_argument("--ramp-from", type=sparsity_fraction, default=None,
                        help="progressive ADMM: the initial Z has this sparsity, and each Z-step's target rises "
                             "from it to --sparsity along a cubic over --ramp-iters iterations (default: none, every "
                             "Z-step at --sparsity)")
    parser.add_argument("--ramp-iters", type=int, default=None,
                        help="ADMM iterations the ramp takes (default: two thirds of --admm-iters)")
    parser.add_argument("--distill", type=float, default=0.0, metavar="WEIGHT",
                        help="also learn from the dense model's outputs (knowledge distillation) with this weight "
                             "in [0, 1] against the labels' 1 - WEIGHT, in ADMM and retraining (default: 0, off)")
    parser.add_argument("--distill-temperature", type=float, default=4.0, metavar="T",
                        help="softmax temperature of the distillation term (default: 4)")


def build_parser() -> argparse.ArgumentParser:
    """The `classify` parser with the train, eval and prune modes."""
    parser = argparse.ArgumentParser(prog="yolo-admm classify", description="LeNet-5 / ResNet-56 classifiers.")
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    train = modes.add_parser("train", help="dense training", description=(
        "Train LeNet-5 or ResNet-56 densely, from --weights or from a seeded initialisation, and save "
        "the weights to --out."))
    add_common_arguments(train, "train")
    train.add_argument("--epochs", type=int, default=10,
                       help="training epochs (default 10; 0 writes the initial weights, seeded by --seed)")
    add_training_arguments(train)
    train.add_argument("--out", type=Path, default=None,
                       help=f"write the weights here (default: {DEFAULT_RUN_DIR}/MODEL-dense.pt)")
    evaluate = modes.add_parser("eval", help="top-1 accuracy on the test set",
                                description="Top-1 accuracy of --weights on the test split of --data.")
    add_common_arguments(evaluate, "eval")
    prune = modes.add_parser("prune", help="dense eval -> prune -> masked retrain -> eval", description=(
        "Evaluate the dense --weights, remove --sparsity of the prunable weights with --method, retrain "
        "with the masks fixed and evaluate again; --out saves the pruned weights, --json-out the result "
        "with its per-layer table (plots beside it)."))
    add_common_arguments(prune, "prune")
    add_prune_arguments(prune)
    add_training_arguments(prune)
    prune.add_argument("--out", type=Path, default=None, help="write the pruned weights here (default: not saved)")
    return parser


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """TrainSettings from the parsed options (ValueError for out-of-range values)."""
    return TrainSettings(
        epochs=getattr(args, "epochs", 0), batch_size=args.batch_size, optimizer=getattr(args, "optimizer", None),
        lr=getattr(args, "lr", None),
        device=args.device, train_samples=getattr(args, "train_samples", None), eval_samples=args.eval_samples,
        eval_every=getattr(args, "eval_every", 1), workers=args.workers, seed=args.seed,
        progress=not args.no_progress, checkpoint_dir=getattr(args, "checkpoint_dir", None),
        resume=getattr(args, "resume", False), ema=getattr(args, "ema", None),
        ema_tau=getattr(args, "ema_tau", 2000.0))


def check_output_file(path: Path | None, flag: str) -> None:
    """Before any work: `path` (when given) can be written (`engine.output_file`)."""
    if path is not None:
        output_file(path, flag)


def check_output_files(args: argparse.Namespace) -> None:
    """Before any work: --out and --json-out can be written, are not one file, and neither is --weights."""
    check_output_file(args.out, "--out")
    check_output_file(args.json_out, "--json-out")
    if args.out is not None and args.json_out is not None and args.out.resolve() == args.json_out.resolve():
        raise ValueError(f"--out and --json-out both name {args.out}: the JSON would overwrite the weights")
    for flag, path in (("--out", args.out), ("--json-out", args.json_out)):
        if path is not None:
            refuse_overwriting_inputs([path], {"--weights": args.weights}, f"{flag} {path}")


def check_checkpoint_dir(args: argparse.Namespace) -> None:
    """Before any work: --checkpoint-dir (when given) is a folder, or is created now."""
    if args.checkpoint_dir is not None:
        output_folder(args.checkpoint_dir, "--checkpoint-dir")


def join_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun, join the process group; --device becomes this process's device."""
    args.device = str(distributed.init_from_env(resolve_device(args.device)))


def run_train(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = DEFAULT_RUN_DIR / f"{args.model}-dense.pt"
        if args.out.exists():
            warnings.warn(f"no --out: this run's weights replace {args.out}, an earlier run's; give --out to keep "
                          f"both", stacklevel=2)
    check_output_files(args)
    check_checkpoint_dir(args)
    join_torchrun(args)
    settings = train_settings(args)
    identity = run_identity("train", args.model, args.data, args.weights, settings)
    with run_folder_lock(settings.checkpoint_dir, "--checkpoint-dir"):   # one job per folder
        claim_checkpoint_dir(settings, identity)
        model, datasets = prepare(args.model, args.data, args.weights, seed=args.seed)
        zero = pruning.weight_sparsity(model) if args.weights is not None else 0.0
        if zero > pruning.PRUNED_ZERO_FRACTION:
            warnings.warn(f"--weights {args.weights}: {100 * zero:.1f}% of its Conv/Linear weights are zero (a pruned "
                          f"model?); train does not keep them at zero: to retrain a pruned model with its masks "
                          f"fixed, use classify prune", stacklevel=2)
        result = train_model(args.model, model, datasets, settings)
        if not distributed.is_main():
            return 0
        out = save_weights(model, args.out)
        print(f"{args.model}: top-1 {result['accuracy']:.2f}% after {counted(settings.epochs, 'epoch')} "
              f"({result['wall_time_s']:.0f} s); weights: {out}")
        if args.json_out is not None:
            atomic_write_json(args.json_out, {**result, "weights": str(out), "run": identity})
        return 0


def run_eval(args: argparse.Namespace) -> int:
    settings = train_settings(args)
    model, datasets = prepare(args.model, args.data, args.weights, splits=("test",))
    model.to(resolve_device(settings.device))
    loader = make_eval_loader(model_spec(args.model), datasets["test"], settings)
    accuracy = evaluate_accuracy(model, loader, settings.device)
    zero = pruning.weight_sparsity(model)
    pruned = f"; {100 * zero:.2f}% of its Conv/Linear weights are zero" if zero > 0 else ""
    print(f"{args.model} {args.weights}: top-1 {accuracy:.2f}% on {len(loader.dataset)} test images{pruned}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    check_output_files(args)
    check_checkpoint_dir(args)
    join_torchrun(args)
    settings = train_settings(args)
    prune = PruneSettings(sparsity=args.sparsity, method=args.method, admm_iters=args.admm_iters,
                          epochs_per_iter=args.epochs_per_iter, rho=args.rho, rho_mult=args.rho_mult,
                          rho_max=args.rho_max, retrain_epochs=args.retrain_epochs, ramp_from=args.ramp_from,
                          include=args.include, exclude=args.exclude, min_density=args.min_density,
                          ramp_iters=args.ramp_iters, distill=args.distill,
                          distill_temperature=args.distill_temperature, admm_lr=args.admm_lr)
    check_weight_patterns(args.model, prune)
    warn_ignored_admm_options(args)
    identity = run_identity("prune", args.model, args.data, args.weights, settings, prune)
    with run_folder_lock(settings.checkpoint_dir, "--checkpoint-dir"):   # one job per folder
        claim_checkpoint_dir(settings, identity)
        load_started = time.perf_counter()
        model, datasets = prepare(args.model, args.data, args.weights, seed=args.seed)
        load_time_s = time.perf_counter() - load_started         # decoding CIFAR-10's JPEGs: longer than a short prune
        result = prune_model(args.model, model, datasets, prune, settings)
        if distributed.is_main():
            report_prune(args, model, {**result, "load_time_s": load_time_s, "run": identity})
        return 0


def report_prune(args: argparse.Namespace, model: nn.Module, result: dict) -> None:
    """Print the prune's table and summary; write --out, --json-out and the plots beside it."""
    print(pruning.format_table(result["layers"]))
    print(f"{args.model} {args.method}: {100 * result['sparsity']:.2f}% of {result['params']} weights removed; "
          f"top-1 {result['dense_accuracy']:.2f}% dense -> {result['pruned_accuracy']:.2f}% pruned "
          f"({result['wall_time_s']:.0f} s, after {result['load_time_s']:.0f} s reading the data and weights)")
    if args.out is not None:
        print(f"pruned weights: {save_weights(model, args.out)}")
    else:
        print("pruned weights: not saved (no --out)")
    if args.json_out is not None:
        atomic_write_json(args.json_out, result)
        plots = save_prune_plots(result, args.json_out)
        print(f"result: {args.json_out}; plots: {', '.join(str(p) for p in plots)}")


RUNNERS = {"train": run_train, "eval": run_eval, "prune": run_prune}


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (the words after `classify`) and run the mode; returns the exit status."""
    try:
        args = parse_arguments(build_parser(), argv)
    except SystemExit as exit_request:  # --help, or a usage error argparse already printed
        return int(exit_request.code or 0)
    try:
        return RUNNERS[args.mode](args)  # yolo_admm.cli reports bad input and training failures
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_hint(args)) from None


def interrupted_hint(args: argparse.Namespace) -> str:
    """What an interrupted `classify` kept, and how to go on."""
    if args.mode == "eval":
        return "nothing to keep"
    folder = getattr(args, "checkpoint_dir", None)
    if folder is None:
        return "nothing was kept: without --checkpoint-dir a run cannot be resumed, only run again"
    newest = max(Path(folder).glob("*/epoch_*.pt"), key=lambda path: path.stat().st_mtime, default=None)
    if newest is None:
        return f"no epoch had finished, so {folder} holds no checkpoint yet"
    again = "run the same command again" if args.resume else "run the same command with --resume"
    return (f"the checkpoints so far are kept in {folder} (newest: {newest.relative_to(folder)}); "
            f"{again} to continue")
