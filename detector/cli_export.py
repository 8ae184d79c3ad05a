"""`yolo-admm detect export`: write a (pruned) detector for edge devices.

    yolo-admm detect export --cfg C --weights W --out DIR [--formats darknet,onnx,compact] [--int8]
    yolo-admm detect export --cfg C --checkpoint RUN/epoch_0010.pt --out DIR
    yolo-admm detect export --cfg C --checkpoint PRUNE_RUN/sparsity_0.8/retrained.pt --out DIR
    (with --checkpoint, --cfg may be left out where the run's folder records it, with its input
    size: detect prune's config.yaml, detect train's args.json)
    yolo-admm detect export --weights model.yaspars --out DIR --formats onnx   (a compact archive: its own cfg)

Writes DIR/model.weights + DIR/model.cfg (Darknet, checked in OpenCV DNN; with class names also
DIR/model.names), DIR/model.onnx (decoding included, checked in onnxruntime) and DIR/model.yaspars
(compact sparse archive, fp16 or --int8 nonzeros), with the class names (--names, those of an
archive given as --weights, or those of the data a run records) in each; prints their sizes against
the dense fp32 model and the archive's entropy bound, and writes the numbers to DIR/export.json.
The sparsity pattern is read from the weights' zeros. An export may not overwrite its own inputs,
nor files of its names in a DIR that holds no DIR/export.json of an earlier export.
An export into DIR replaces the one before it: once the new files are written, the files the
earlier DIR/export.json lists and this export did not write again are removed (this export's
inputs excepted).
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import yaml

from detector.cli import network_size, read_class_names
from detector.loading import load_detector
from detector.export import FORMAT_SUFFIXES, FORMATS, check_export, export_model, export_targets
from detector.model import DarknetModel, load_darknet
from detector.weights import WeightsHeader
from engine import atomic_write_json, load_error_summary, output_folder, refuse_overwriting_inputs
from engine.checkpoint import checked_trainer_checkpoint, checkpoint_file, find_latest_checkpoint, read_checkpoint_file
from pruning.masks import Masks
from pruning.sparse_archive import is_sparse_archive
from yolo_admm.wording import counted

STAGE_FILE_KEYS = {"model", "masks"}     # detect prune's sparsity_S/hard_prune.pt and retrained.pt
STAGE_FILE_OPTIONAL_KEYS = {"weights_header"}
EXPORT_STEM = "model"
EXPORT_NAMES = {f"{EXPORT_STEM}{suffix}" for suffixes in FORMAT_SUFFIXES.values() for suffix in suffixes}  # run's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", help="Darknet .cfg file (not needed with a compact archive, which carries its cfg)")
    parser.add_argument("--weights", help="Darknet .weights file or a compact archive (.yaspars) (or give --checkpoint; "
                                          "with --checkpoint, only an archive, for its cfg)")
    parser.add_argument("--checkpoint", help="training checkpoint (.pt, or a folder: its newest) whose weights "
                                             "to export, its EMA weights when it has them, as training evaluated; "
                                             "or a prune run's stage file (sparsity_S/hard_prune.pt, retrained.pt); "
                                             "without --cfg, the cfg (and input size) the run's config.yaml or "
                                             "args.json records")
    parser.add_argument("--formats", type=_formats, default=list(FORMATS), metavar="LIST",
                        help=f"comma-separated, from {','.join(FORMATS)} (default: all)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder; an export there replaces the files of the one before (by its export.json)")
    parser.add_argument("--names", type=Path, default=None,
                        help="class names to ship with the model (a Darknet .names file, a data.yaml or a COCO json): "
                             "a .names file beside the .weights, the ONNX metadata and the archive (default: those "
                             "a compact archive given as --weights carries, or those of the training data a run "
                             "recorded, for its --checkpoint without --cfg)")
    parser.add_argument("--int8", action="store_true",
                        help="compact archive: int8 nonzeros with per-tensor scales (lossy) instead of fp16")
    parser.add_argument("--img-size", type=network_size, default=None, metavar="N",
                        help="export for an N x N input: the ONNX input and the [net] width and height of "
                             "the written cfg and archive; default: the cfg's width x height")


def run(args: argparse.Namespace) -> int:
    if args.int8 and "compact" not in args.formats:
        raise ValueError(f"--int8 applies to the compact archive only, and --formats {','.join(args.formats)} "
                         f"writes none: add compact, or leave --int8 out")
    cfg, img_size, settings = args.cfg, args.img_size, {}
    if cfg is None and args.weights is None and args.checkpoint is not None:
        record, settings = recorded_run(args.checkpoint) or (None, {})
        cfg = settings.get("cfg")
        img_size = img_size or settings.get("img_size")
        if record is not None:
            size = f" at {img_size}x{img_size}" if img_size else ""
            print(f"export: the cfg {cfg}{size}, as {record} records")
    model = load_export_model(cfg, args.weights, args.checkpoint)
    if args.names is not None:
        model.class_names = read_class_names(args.names, int(model.heads[0].num_classes))
    elif (data := recorded_data(settings)) is not None:               # a run's own checkpoint, its cfg taken
        model.class_names = recorded_class_names(data, int(model.heads[0].num_classes))
    value_format = "int8" if args.int8 else "fp16"
    check_export(model, args.formats, value_format, img_size)
    given = {"--cfg": cfg, "--weights": args.weights, "--checkpoint": args.checkpoint, "--names": args.names}
    inputs = {Path(path).resolve() for path in given.values() if path}
    targets = export_targets(args.out, args.formats, EXPORT_STEM)
    refuse_overwriting_inputs(targets, given, f"--out {args.out}")
    json_path = args.out / "export.json"
    foreign = [target for target in targets if os.path.lexists(target)] if not os.path.lexists(json_path) else []
    if foreign:                                     # a folder no detect export wrote into: the user's files
        raise ValueError(f"--out {args.out}: expected a new folder or one an earlier detect export wrote into (its "
                         f"export.json is not there), found {counted(len(foreign), 'file')} that this export "
                         f"would replace ({', '.join(t.name for t in foreign)}); choose another --out")
    earlier = exported_files(json_path)
    output_folder(args.out, "--out")                # after the inputs are known good: no empty folder
    masks = Masks.from_model(model)
    report = export_model(model, args.out, args.formats, masks, value_format, img_size, stem=EXPORT_STEM)
    print(format_report(report))
    atomic_write_json(json_path, report)
    print(f"report written to {json_path}")
    for stale in sorted(earlier - exported_files(json_path)):
        if stale.resolve() in inputs:                 # exported again from the earlier export's files
            continue
        stale.unlink(missing_ok=True)
        print(f"removed {stale}, which the earlier export in {args.out} wrote")
    return 0


def exported_files(report_path: Path) -> set[Path]:
    """The files an export report (`export.json`) lists that this command writes (`EXPORT_NAMES`),
    taken by name in the report's folder (so a report that names them relative to another working
    folder finds them too); none when there is no readable report."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    entries = [report.get(name) for name in FORMATS] if isinstance(report, dict) else []
    names = {Path(entry[key]).name for entry in entries if isinstance(entry, dict)
             for key in ("weights", "cfg", "names", "path") if isinstance(entry.get(key), str)}
    return {report_path.parent / name for name in names & EXPORT_NAMES}


def load_export_model(cfg: str | None, weights: str | None, checkpoint: str | None) -> DarknetModel:
    """The model of `cfg` with `weights` (`load_detector`: .weights or a compact archive), then, if
    given, the weights of a training checkpoint."""
    if weights is None and checkpoint is None:
        raise ValueError("give the weights to export: --weights W.weights or --checkpoint CKPT")
    if weights is None and cfg is None:
        raise ValueError(f"--checkpoint {checkpoint} needs --cfg, the cfg its model was built from (or --weights "
                         f"with a compact archive of that model, whose cfg it takes); no run folder above it "
                         f"records one (a run's config.yaml or args.json counts only in the folder the run wrote "
                         f"it to, not in one moved or copied since)")
    if weights is not None and checkpoint is not None and Path(weights).is_file() and not is_sparse_archive(weights):
        raise ValueError(f"--weights {weights} and --checkpoint {checkpoint} both give the weights to export (the "
                         f"checkpoint's would replace these); with --checkpoint, --weights may only be a compact "
                         f"archive, for its cfg: leave one of them out")
    model = load_detector(cfg, weights) if weights is not None else load_darknet(cfg)
    if checkpoint is not None:
        try:
            weights_state, header = checkpoint_weights(checkpoint, model.net.batch)
            model.load_state_dict(weights_state)
            model.weights_header = header
        except RuntimeError as err:
            raise ValueError(f"{checkpoint}: its model does not fit {cfg or weights}: {load_error_summary(err)}") from None
    return model.float().eval()


def recorded_data(settings: dict) -> Path | None:
    """The training data a run's record names (`data`: a data.yaml; `train_annotations` of `detect
    prune` or `annotations` of `detect train`: a COCO json), or None."""
    for key in ("data", "train_annotations", "annotations"):
        if isinstance(settings.get(key), str):
            return Path(settings[key])
    return None


def recorded_class_names(data: Path, num_classes: int) -> list[str] | None:
    """The class names of the data.yaml or COCO json a run trained on, or None (with a warning) where
    it is gone or does not fit the model: the export then carries none, as without a run."""
    try:
        names = read_class_names(data, num_classes)
    except (OSError, ValueError) as error:
        warnings.warn(f"the run's data {data}: {error}; exporting without class names (give --names)", stacklevel=2)
        return None
    print(f"export: the class names of {data}, as the run records")
    return names


RUN_RECORDS = ("config.yaml", "args.json")    # what detect prune and detect train write into their --out


def recorded_run(checkpoint: str | Path) -> tuple[Path, dict] | None:
    """(the record, its settings) of the run a checkpoint belongs to: `detect prune`'s config.yaml
    or `detect train`'s args.json in the checkpoint's folder or up to three above it (a prune run's
    `sparsity_S/retrained.pt`, `sparsity_S/admm/epoch_N.pt`), taken only where the record's `out`
    is the folder it is in and its `cfg` is an existing file (an unreadable file of that name, or
    another tool's, is passed over); None when there is none."""
    path = Path(checkpoint).resolve()
    start = path if path.is_dir() else path.parent
    for folder in [start, *start.parents][:4]:
        for name in RUN_RECORDS:
            record = folder / name
            try:
                text = record.read_text(encoding="utf-8")
                settings = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
            except (OSError, ValueError, yaml.YAMLError):       # none there, or not a record
                continue
            if not isinstance(settings, dict) or not isinstance(settings.get("out"), str):
                continue
            cfg = settings.get("cfg")
            own_folder = Path(settings["out"]).resolve() == folder
            if own_folder and isinstance(cfg, str) and Path(cfg).is_absolute() and Path(cfg).is_file():
                return record, settings
    return None


def checkpoint_weights(checkpoint: str | Path, batch: int) -> tuple[dict, WeightsHeader | None]:
    """The state dict to export from a prune run's stage file ({"model", "masks"}, as `detect prune`
    writes hard_prune.pt and retrained.pt) or a trainer checkpoint (its EMA when it has one), and the
    `.weights` header: a stage file's records that of the file its model was read from (None for
    older runs); a trainer checkpoint's counts `seen` as `detect train` does, its optimizer steps x
    the cfg's [net] `batch`."""
    path = prune_run_checkpoint(Path(checkpoint))
    saved = read_checkpoint_file(path)
    if isinstance(saved, dict) and STAGE_FILE_KEYS <= set(saved) <= STAGE_FILE_KEYS | STAGE_FILE_OPTIONAL_KEYS:
        header = saved.get("weights_header")
        return saved["model"], WeightsHeader(**header) if isinstance(header, dict) else None
    state = checked_trainer_checkpoint(saved, path)
    ema = state.get("ema")
    weights = ema["module"] if isinstance(ema, dict) and "module" in ema else state["model"]
    return weights, WeightsHeader(seen=int(state["step"]) * int(batch))


def prune_run_checkpoint(path: Path) -> Path:
    """The checkpoint file `path` names (`engine.checkpoint_file`), where a prune run's folders are
    read as a user means them: a sparsity folder, which holds no epoch checkpoint, is its
    `retrained.pt`, the run's final model (said so); a checkpoint of its `retrain/` folder is taken
    with a warning that it comes before the run's final BatchNorm recalibration."""
    if path.is_dir() and find_latest_checkpoint(path) is None and (path / RETRAINED_STAGE_FILE).is_file():
        print(f"export: {path / RETRAINED_STAGE_FILE}, the final model of this prune run's sparsity folder")
        return path / RETRAINED_STAGE_FILE
    sparsity_folders = sorted(final.parent.name for final in path.glob(f"sparsity_*/{RETRAINED_STAGE_FILE}"))
    if path.is_dir() and find_latest_checkpoint(path) is None and sparsity_folders:
        raise FileNotFoundError(f"{path}: a detect prune run's folder, with a final model per sparsity: expected "
                                f"--checkpoint {path}/sparsity_S, one of "
                                f"{', '.join(sparsity_folders)}")
    file = checkpoint_file(path)
    final = file.parent.parent / RETRAINED_STAGE_FILE
    if file.parent.name == "retrain" and final.is_file():
        warnings.warn(f"{file}: a checkpoint of the retraining, before the run's final BatchNorm recalibration; "
                      f"the model the run measured and exported is {final}", stacklevel=2)
    if file.parent.name == "admm" and file.parent.parent.name.startswith("sparsity_"):
        warnings.warn(f"{file}: a checkpoint of the ADMM phase, before the hard prune: its weights are not pruned; "
                      f"the pruned model is {final}{'' if final.is_file() else ', once the run has finished'}",
                      stacklevel=2)
    return file


RETRAINED_STAGE_FILE = "retrained.pt"      # a prune run's final model, in each sparsity_S folder


def format_report(report: dict) -> str:
    """A table: one line per exported file with its size and its ratio to the dense fp32 model."""
    dense = report["dense_fp32_bytes"]
    lines = [f"{'format':<9}{'file':<40}{'bytes':>12}{'vs dense':>10}  check",
             f"{'dense':<9}{'(fp32, all tensors)':<40}{dense:>12,}{1.0:>10.3f}"]
    checks = {"darknet": ("opencv_max_rel_diff", "OpenCV max rel diff"),
              "onnx": ("onnxruntime_max_rel_diff", "onnxruntime max rel diff"),
              "compact": ("output_max_rel_diff", "decoded, max rel diff")}
    for name in FORMATS:
        if name not in report:
            continue
        entry = report[name]
        path = entry.get("weights", entry.get("path"))
        key, label = checks.get(name, (None, ""))
        check = f"{label} {entry[key]:.2g}" if key in entry else ""
        lines.append(f"{name:<9}{str(path):<40}{entry['bytes']:>12,}{entry['bytes'] / dense:>10.3f}  {check}")
    if "compact" in report:
        c = report["compact"]
        bound = ("no entropy bound (constant tensors)" if c["ratio_to_bound"] is None else
                 f"{c['ratio_to_bound']:.3f} x their entropy bound ({c['entropy_bound_bytes']:,.0f} bytes)")
        rounded = ""
        if c.get("rounded_to_zero"):                # the format stores the smallest weights as 0
            rounded = f"; {c['value_format']} rounded {c['rounded_to_zero']:,} more to 0"
        lines.append(f"compact: {c['nonzero']:,} of {c['params']:,} weights kept (sparsity {c['sparsity']:.3f}"
                     f"{rounded}), {c['value_format']} values; masks + values {c['sparse_bytes']:,} bytes = {bound}")
        if "max_rel_error" in c:
            lines.append(f"compact: stored weights within {c['max_rel_error']:.2g} of each tensor's max |w| "
                         f"(largest error {c['max_abs_error']:.2g}); the outputs on a random input within "
                         f"{c['output_max_rel_diff']:.2g} (relative)")
    return "\n".join(lines)


def _formats(text: str) -> list[str]:
    """argparse type of --formats: a comma-separated subset of FORMATS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {','.join(FORMATS)}, found {text!r}")
    return names

