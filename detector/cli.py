"""`yolo-admm detect MODE [options]`: the detector's modes.

Each mode lives in its own module `detector.cli_<mode>`, which provides `add_arguments(parser)` and
`run(args) -> int`, and may provide `interrupted_hint(args) -> str` (what Ctrl-C kept and how to
resume). To add a mode, add one line to `MODES`.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from data.sources import coco_class_names, parse_class_names, read_data_yaml, read_utf8
from detector.cfg import check_rgb_input
from detector.export import check_class_names
from detector.loading import load_detector
from engine import distributed, resolve_device
from yolo_admm.arguments import parse_arguments

MODES = {
    "predict": ("detector.cli_predict", "detect objects in images: annotated images + detections JSON"),
    "eval": ("detector.cli_eval", "COCO mAP (pycocotools) on a COCO json or YOLO txt dataset"),
    "train": ("detector.cli_train", "train or fine-tune on a data.yaml or COCO json dataset"),
    "prune": ("detector.cli_prune", "the main job: global ADMM pruning, retraining, evaluation, export"),
    "export": ("detector.cli_export", "export to Darknet .weights, ONNX and a compact sparse archive"),
}
ONE_PROCESS_MODES = ("predict", "eval", "export")     # refused under torchrun with several processes


def build_parser() -> argparse.ArgumentParser:
    """The `detect` parser with one subcommand per entry of `MODES`."""
    parser = argparse.ArgumentParser(prog="yolo-admm detect", description="Darknet YOLO detectors.")
    subparsers = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    for mode, (module_name, summary) in MODES.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(mode, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, interrupted_hint=getattr(module, "interrupted_hint", None))
    return parser


def main(argv: list[str]) -> int:
    """Parse `argv` (the words after `detect`) and run the chosen mode; returns the exit status."""
    try:
        args = parse_arguments(build_parser(), argv)
    except SystemExit as exit_request:  # --help, or a usage error argparse already printed
        return int(exit_request.code or 0)
    if args.mode in ONE_PROCESS_MODES and distributed.launched_processes() > 1:
        raise distributed.EveryRankError(f"detect {args.mode} runs in one process (it does not train, and its "
                                         f"processes would write the same files): run it without torchrun")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if args.interrupted_hint is None:
            raise
        raise KeyboardInterrupt(args.interrupted_hint(args)) from None


def network_size(text: str) -> int:
    """argparse type of --img-size: a positive multiple of 32."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer multiple of 32, found {text!r}") from None
    if value <= 0 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32 (the network's stride), found {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--cfg, --weights, --img-size, --device, --no-progress: the options every mode that runs a model takes."""
    parser.add_argument("--cfg", help="Darknet .cfg file (not needed with a compact archive, which carries its cfg)")
    parser.add_argument("--weights", required=True,
                        help="Darknet .weights file, or a compact archive (.yaspars) that detect export wrote")
    parser.add_argument("--img-size", type=network_size, default=None, metavar="N",
                        help="network input N x N (multiple of 32); default: the cfg's width x height")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int, int, bool]:
    """Load the model of --cfg/--weights (`load_detector`) onto --device.

    Returns (model, net_w, net_h, letterbox): the input size is --img-size or the cfg's [net] size,
    and letterbox is the cfg's [net] letter_box.
    """
    model = load_detector(args.cfg, args.weights)
    check_rgb_input(model.net)
    net_w, net_h = (args.img_size, args.img_size) if args.img_size else (model.net.width, model.net.height)
    if not model.accepts_size(net_h, net_w):
        raise ValueError(f"{args.cfg or args.weights}: the network input would be {net_w}x{net_h}; expected "
                         f"{model.size_rule()} (pass --img-size)")
    model.to(resolve_device(args.device)).eval()
    return model, net_w, net_h, bool(model.net.letter_box)


def read_class_names(path: Path | None, num_classes: int) -> list[str]:
    """Names from a .names file, a data.yaml's `names` (list or dict) or a COCO instances json's
    categories (by sorted id); indices when `path` is None."""
    if path is None:
        return [str(i) for i in range(num_classes)]
    if not path.is_file():
        raise ValueError(f"--names {path}: expected a .names file, a data.yaml or a COCO json, found "
                         f"{'a folder' if path.is_dir() else 'nothing'}")
    if path.suffix in (".yaml", ".yml"):
        names = parse_class_names(read_data_yaml(path), path)
    elif path.suffix == ".json":
        names = coco_class_names(path)
    else:
        names = [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
    if not isinstance(names, list) or len(names) != num_classes:
        raise ValueError(f"{path}: expected {num_classes} class names (the model's classes), "
                         f"found {len(names) if isinstance(names, list) else names!r}")
    names = [str(n) for n in names]
    check_class_names(names, str(path))
    return names


def model_num_classes(model: torch.nn.Module) -> int:
    """The number of classes the model's [yolo] heads predict."""
    return int(model.heads[0].num_classes)
