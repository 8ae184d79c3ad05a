"""`yolo-admm detect prune`: the main job (see `detector.prune_pipeline`).

Settings come from the defaults, then `--config job.yaml`, then the flags given here. Running the
same command again resumes the run in --out (after Ctrl-C, say).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import yaml

from detector.cli import network_size
from detector.export import FORMATS as EXPORT_FORMATS
from detector.prune_job import METHODS, RECORDED_ONLY, PruneJob
from detector.prune_pipeline import format_stage_table, run_job
from engine import distributed, refuse_overwriting_inputs
from yolo_admm.arguments import pattern_list


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list, found {text!r}") from None


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of settings: keys as the long flags, with _ (progress: false for "
                        "--no-progress), and in the YAML only: augment (default true), mosaic (probability, "
                        "default 0), multi_scale (default false: one input size), amp (default true), "
                        "latency_runs (default 10), layer_sparsity (pattern: sparsity, for admm-layerwise); its "
                        "relative paths are from the current folder; the flags override it")
    parser.add_argument("--cfg", help="Darknet .cfg of the pretrained detector")
    parser.add_argument("--weights", help="its Darknet .weights, or a compact archive of the same cfg (without: "
                        "the cfg's random initial weights, with a warning)")
    parser.add_argument("--data", help="Ultralytics data.yaml with train and val splits")
    parser.add_argument("--train-images", help="COCO json alternative: training image folder")
    parser.add_argument("--train-annotations", help="COCO json alternative: training instances json")
    parser.add_argument("--val-images", help="COCO json alternative: validation image folder")
    parser.add_argument("--val-annotations", help="COCO json alternative: validation instances json")
    parser.add_argument("--out", help="run folder (default runs/prune); an existing one is resumed")
    parser.add_argument("--sparsity", type=_floats, help="fraction of the prunable weights (those --include/--exclude "
                        "select) removed, or a list 0.5,0.7,0.9 (default 0.8); the result's nonzero and sparsity "
                        "columns count every conv weight")
    parser.add_argument("--method", choices=METHODS, help="pruning method (default admm-global)")
    parser.add_argument("--include", type=pattern_list, metavar="PATTERNS",
                        help="parameter-name patterns that may be pruned, comma-separated globs or re:REGEX "
                             "(default: every conv weight)")
    parser.add_argument("--exclude", type=pattern_list, metavar="PATTERNS",
                        help="parameter-name patterns never pruned, comma-separated globs or re:REGEX "
                             "(e.g. 'layers.120.*')")
    parser.add_argument("--min-density", type=float, help="keep at least this fraction of every layer (default 0)")
    parser.add_argument("--admm-iters", type=int, help="ADMM iterations (default 4)")
    parser.add_argument("--epochs-per-iter", type=int, help="training epochs per ADMM iteration (default 2)")
    parser.add_argument("--rho", type=float, help="initial ADMM penalty (default 1e-3)")
    parser.add_argument("--rho-mult", type=float, help="rho multiplier per ADMM iteration (default 2)")
    parser.add_argument("--rho-max", type=float, help="cap on rho (default 0.1; a cap below --rho is raised to --rho)")
    parser.add_argument("--ramp-from", type=float, help="progressive ADMM: the initial Z's sparsity; each Z-step's "
                        "target rises from it to --sparsity along a cubic over --ramp-iters (default: none)")
    parser.add_argument("--ramp-iters", type=int, help="ADMM iterations the ramp takes (default: two thirds of them)")
    parser.add_argument("--retrain-epochs", type=int, help="masked retraining epochs (default 4)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the cfg's [net] learning_rate)")
    parser.add_argument("--burn-in", type=int,
                        help="warm-up optimizer steps at the start of each phase, ADMM and retraining "
                             "(default 0: the model is pretrained)")
    parser.add_argument("--batch-size", type=int,
                        help="images per forward pass (default: [net] batch/subdivisions); gradients are "
                             "accumulated over passes until an optimizer step has seen the cfg's [net] batch "
                             "(a warning says where this size cannot make it)")
    parser.add_argument("--img-size", type=network_size,
                        help="network input side (default: the cfg's width, which must equal its height)")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--bn-images", type=int, help="training images whose statistics replace the BatchNorm running "
                        "statistics after hard pruning and after retraining (default 256; 0: off)")
    parser.add_argument("--export", type=_comma_list, help=f"formats, comma-separated (default {','.join(EXPORT_FORMATS)})")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                        help="no progress bars")


def job_of(args: argparse.Namespace) -> PruneJob:
    """The job of --config and the flags (the flags win)."""
    overrides = {key: value for key, value in vars(args).items()
                 if key not in {"config", "run", "mode", "interrupted_hint"}}
    return PruneJob.from_sources(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    try:
        job = job_of(args)
        refuse_overwriting_inputs(written_files(job), {
            "--config": args.config, "--cfg": job.cfg, "--weights": job.weights, "--data": job.data,
            "--train-annotations": job.train_annotations, "--val-annotations": job.val_annotations},
            f"--out {job.out}")
        check_no_foreign_config(job)
    except ValueError as error:               # every rank reads the same flags and --config: said once
        raise distributed.EveryRankError(str(error)) from None
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if job.weights is None and distributed.is_main():
        warnings.warn(f"no --weights: pruning {job.cfg} with its random initial weights", stacklevel=2)
    results = run_job(job)
    if distributed.is_main():
        print(format_stage_table(results["sweep"]))
        print(f"\nresults: {job.out}/results.json")
    return 0


def written_files(job: PruneJob) -> list[Path]:
    """The files of fixed names a run writes into --out, but its config.yaml: a run's own record
    there is written again, another file refused (`check_no_foreign_config`)."""
    return [Path(job.out) / "log.txt", Path(job.out) / "results.json"]


def check_no_foreign_config(job: PruneJob) -> None:
    """A config.yaml in --out that no run wrote (a user's file kept there, or given as --config)
    would be replaced by the run's record: refused, naming it."""
    config = Path(job.out) / "config.yaml"
    if config.exists() and not is_run_record(config):
        raise ValueError(f"--out {job.out}: holds a config.yaml that no run wrote (it records no '{RECORDED_ONLY}'), "
                         f"which this run would replace with its own record; expected a new folder or a run's own: "
                         f"move that file, or choose another --out")


def is_run_record(path: Path) -> bool:
    """Whether the config.yaml at `path` is what a run wrote: it records the number of processes
    (`RECORDED_ONLY`), which no job file sets, or a stage finished beside it (older runs)."""
    if (path.parent / "dense.json").is_file():
        return True
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(recorded, dict) and RECORDED_ONLY in recorded


def interrupted_hint(args: argparse.Namespace) -> str:
    """What an interrupted `detect prune` kept, and how to go on."""
    return (f"the finished stages and the checkpoints so far are kept in {job_of(args).out}; "
            f"run the same command again to resume")
