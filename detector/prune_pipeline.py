"""The main job: prune a pretrained Darknet detector, one global budget over all its weights.

Stages, each written into the run folder and skipped when its output is already there (so a
killed run resumes; mid-stage, training resumes from the trainer's newest checkpoint):

1. ``dense``: COCO mAP of the pretrained model.
2. ``admm`` (ADMM methods only): ``admm_iters`` ADMM iterations of ``epochs_per_iter`` epochs each,
   trained on the full detection loss plus the ADMM penalty; rho grows by ``rho_mult`` per iteration;
   with ``ramp_from`` the Z-step's sparsity rises from it to the target over ``ramp_iters`` iterations.
3. ``hard_prune``: weights outside Z's support (or the magnitude baseline's masks) set to zero.
4. ``retrained``: ``retrain_epochs`` of masked retraining (magnitude baselines get the ADMM epochs
   too, so every method has the same training budget).

After stages 3 and 4 the BatchNorm running statistics are recomputed from ``bn_images`` training
images (plain resize, no augmentation; ``torch.optim.swa_utils.update_bn``): zeroing weights shifts
every layer's output statistics, and Darknet's BN momentum of 0.01 leaves the old running
statistics mostly in place through a short retraining, so the evaluated model would otherwise
normalise with the dense model's statistics. A channel that is constant on those images gets a
BN scale of 0 (``detector.batchnorm.silence_constant_channels``), so that it outputs its bias without amplified noise.
5. export of the retrained model: Darknet ``.weights``, ONNX and the compact sparse archive.

Every stage gets a record: mAP50-95, mAP50, nonzero prunable weights, sparsity, compact-archive
size and CPU latency per image. A list of sparsities sweeps them, each in its own sub-folder, and
draws mAP against sparsity.

Under torchrun (``torchrun --nproc_per_node=N -m yolo_admm detect prune ...``) every rank trains,
rank 0 alone evaluates, measures, exports and writes files, and rank 0's view of which stages are
done is sent to every rank (the run folder must be the same shared folder for every rank to resume).
"""
from __future__ import annotations

import io
import json
import logging
import math
import pickle
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Subset

import detector
import pruning
from data.augment import AugmentConfig
from data.sources import DetectionSource, load_coco_json, load_yolo_dataset
from data.train_dataset import DetectionTrainDataset, collate_detection
from detector.batchnorm import recompute_batchnorm_statistics
from detector.class_checks import check_classes, check_same_classes
from detector.export import (check_class_names, dense_fp32_bytes, export_compact, export_model,
                             require_opencv_darknet_importer)
from detector.predict import inference_copy
from detector.loading import load_to_train
from detector.prune_job import RECORDED_ONLY, PruneJob
from detector.train import (DetectTrainConfig, ValidationMap, build_detector_trainer, check_training_options,
                            training_side)
from detector.weights import WeightsHeader
from engine import (atomic_torch_save, atomic_write_bytes, atomic_write_json, changed_settings, describe_changes,
                    distributed, find_latest_checkpoint, held_iteration, output_folder, remove_stale_temp_files,
                    resolve_device, resolved_paths, run_folder_lock, seeded_cpu_stream, unreadable_detail)
from yolo_admm.wording import counted

LOG = logging.getLogger("yolo_admm.prune")

# ---------------------------------------------------------------------------------- helpers
def write_json_on_main(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (under torchrun: on rank 0 only)."""
    return atomic_write_json(path, payload) if distributed.is_main() else path


def load_sources(job: PruneJob) -> tuple[DetectionSource, DetectionSource]:
    """(train, val) detection sources of the job."""
    if job.data is not None:
        return load_yolo_dataset(job.data, "train"), load_yolo_dataset(job.data, "val")
    return (load_coco_json(job.train_images, job.train_annotations),
            load_coco_json(job.val_images, job.val_annotations))


def nonzero_stats(model: torch.nn.Module) -> dict[str, float]:
    """Prunable weights, their nonzeros and the sparsity over them; all parameters and their nonzeros."""
    rows = pruning.layer_table(model)
    totals = pruning.table_totals(rows)
    all_params = sum(p.numel() for p in model.parameters())
    all_nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return {"prunable_params": totals["params"], "nonzero_prunable": totals["kept"],
            "sparsity": totals["sparsity"], "params": all_params, "nonzero_params": all_nonzero}


@torch.inference_mode()
def cpu_latency_ms(model: torch.nn.Module, size: int, runs: int) -> float:
    """Median CPU time in ms of one forward pass at batch 1, with the inference copy evaluation uses."""
    cpu_model = inference_copy(model).cpu()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))  # global RNG untouched
    cpu_model(image)  # warm-up
    times = []
    for _ in range(max(runs, 1)):
        started = time.perf_counter()
        cpu_model(image)
        times.append(1000.0 * (time.perf_counter() - started))
    return float(sorted(times)[len(times) // 2])


# ---------------------------------------------------------------------------------- stages
@dataclass
class RunContext:
    """What every stage of one run shares."""

    job: PruneJob
    root: Path
    train: DetectionSource
    val: DetectionSource
    evaluator: ValidationMap
    size: int
    letterbox: bool
    device: torch.device          # where this process trains, evaluates and recalibrates

    def load_model(self) -> torch.nn.Module:
        """The job's model, with the training data's class names (so that its exports carry them);
        without weights, the same random initialisation (from the job's seed) at every call.
        Building it (on the CPU) leaves torch's random streams as they were."""
        with seeded_cpu_stream(self.job.seed):
            return self.named(load_to_train(self.job.cfg, self.job.weights))

    def named(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` with the training data's class names, which its exports carry."""
        model.class_names = list(self.train.class_names)
        return model

    def train_config(self, epochs: int, checkpoint_dir: Path) -> DetectTrainConfig:
        job = self.job
        return DetectTrainConfig(
            epochs=epochs, batch_size=job.batch_size, img_size=self.size, lr=job.lr, burn_in=job.burn_in,
            augment=job.augment, mosaic=job.mosaic, multi_scale=job.multi_scale, ema=False, eval_every=0,
            workers=job.workers, device=job.device, amp=job.amp, out_dir=checkpoint_dir, progress=job.progress,
            resume=checkpoint_dir if distributed.broadcast_object(find_latest_checkpoint(checkpoint_dir)) else None)

    @torch.no_grad()
    def recalibrate_batchnorm(self, model: torch.nn.Module) -> None:
        """Replace the BN running statistics of ``model`` by their average over ``job.bn_images``
        training images drawn with the job's seed (every rank draws the same ones), fitted to the
        network input without augmentation, with the cfg's ``[dropout]`` layers passing their input
        as in evaluation (their masks would come from torch's global stream, which a data loader's
        worker seeds and a resume move: statistics would differ run to run); unreadable images are
        skipped as in training. Runs on the run's device; ``model`` is left there."""
        if self.job.bn_images == 0:
            return
        dataset = DetectionTrainDataset(self.train, AugmentConfig(self.size, self.letterbox), augment=False)
        generator = torch.Generator().manual_seed(self.job.seed)
        chosen = torch.randperm(len(dataset), generator=generator)[:self.job.bn_images].sort().values.tolist()
        model.to(self.device)     # a magnitude prune's model is still where it was built, on the CPU
        loader = DataLoader(Subset(dataset, chosen), batch_size=self.job.batch_size or 8,
                            num_workers=self.job.workers, collate_fn=collate_detection)
        silenced = recompute_batchnorm_statistics(model, held_iteration(loader), self.device)
        if silenced:
            LOG.info("BatchNorm: %s constant on the calibration images, their scale set to 0",
                     counted(silenced, "channel"))

    def record(self, stage: str, model: torch.nn.Module, folder: Path,
               masks: pruning.Masks | None = None) -> dict[str, Any]:
        """Evaluate ``model`` and write its stage record to ``folder/<stage>.json`` (under torchrun:
        rank 0 measures and writes, every rank gets the record)."""
        record = self._measure(stage, model, folder, masks) if distributed.is_main() else None
        return distributed.broadcast_object(record)

    def _measure(self, stage: str, model: torch.nn.Module, folder: Path,
                 masks: pruning.Masks | None) -> dict[str, Any]:
        metrics = self.evaluator(model.eval())
        with tempfile.TemporaryDirectory() as scratch:          # not in the run folder, where a kill would leave it
            archive = Path(scratch) / f"{stage}.yaspars"
            export_compact(model, masks, archive, verify=False)    # the size of the archive the export writes
            compact_bytes = archive.stat().st_size
        record = {"stage": stage, "map50_95": metrics["map50_95"], "map50": metrics["map50"],
                  **nonzero_stats(model), "compact_bytes": compact_bytes,
                  "dense_fp32_bytes": dense_fp32_bytes(model),
                  "cpu_latency_ms": cpu_latency_ms(model, self.size, self.job.latency_runs)}
        write_json_on_main(folder / f"{stage}.json", record)
        LOG.info("%s: mAP50-95 %.4f  mAP50 %.4f  sparsity %.2f%%", stage, record["map50_95"], record["map50"],
                 100 * record["sparsity"])
        return record


def stage_done(path: Path) -> dict[str, Any] | None:
    """The stage record at ``path`` when that stage already finished, else None (rank 0's answer
    on every rank under torchrun)."""
    record, damaged = None, None
    if distributed.is_main() and path.is_file():
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            damaged = f"{path}: damaged stage record ({error}); delete it to run that stage again"
        except OSError as error:
            damaged = f"{path}: cannot read this stage record ({error.strerror or error})"
    record, damaged = distributed.broadcast_object((record, damaged))
    if damaged is not None:                     # on every rank, so none waits for the others; said once
        raise distributed.EveryRankError(damaged)
    return record


def save_state(path: Path, model: torch.nn.Module, masks: pruning.Masks) -> None:
    """A stage's model and masks, and the `.weights` header the model was read with (so that a
    resumed run exports the same file)."""
    if distributed.is_main():
        header = getattr(model, "weights_header", None)
        atomic_torch_save({"model": model.state_dict(), "masks": masks.state_dict(),
                           "weights_header": None if header is None else asdict(header)}, path)


def load_state(path: Path, ctx: RunContext) -> tuple[torch.nn.Module, pruning.Masks]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:  # a damaged file
        if isinstance(error, torch.OutOfMemoryError):
            raise
        raise ValueError(f"{path}: damaged stage state ({unreadable_detail(error)}); "
                         f"delete it to run that stage again") from error
    model = ctx.named(detector.load_darknet(ctx.job.cfg))
    model.load_state_dict(state["model"])
    if state.get("weights_header") is not None:                 # states of older runs have none
        model.weights_header = WeightsHeader(**state["weights_header"])
    masks = pruning.Masks({name: mask for name, mask in state["masks"].items()})
    return model, masks


def seed_phase(seed: int, sparsity: float, phase: str) -> None:
    """Seed torch for one training phase from (seed, sparsity, phase) alone. The phase then trains
    alike whether the stages before it ran in this process or were skipped on resume: their
    evaluations, and the other sparsities of a sweep, draw from torch's random stream."""
    torch.manual_seed(zlib.crc32(f"{seed}/{sparsity!r}/{phase}".encode()))


def run_admm(ctx: RunContext, model: torch.nn.Module, sparsity: float, folder: Path) -> pruning.Masks:
    """ADMM with the full detection loss; returns the hard-pruning masks (the support of Z)."""
    job = ctx.job
    seed_phase(job.seed, sparsity, "admm")
    scope = pruning.pruning_method(job.method).scope
    config = ctx.train_config(job.admm_epochs, folder / "admm")
    trainer = build_detector_trainer(model, ctx.train, None, config)  # moves the model to its device
    admm = pruning.ADMM(model, pruning.ADMMConfig(
        sparsity=sparsity, scope=scope, layer_sparsity=job.layer_sparsity if scope == "layerwise" else None,
        rho=job.rho, rho_multiplier=job.rho_mult, rho_max=max(job.rho_max, job.rho),
        include=job.include, exclude=job.exclude, min_density=job.min_density, ramp_from=job.ramp_from,
        ramp_updates=pruning.ramp_updates(sparsity, job.ramp_from, job.ramp_iters, job.admm_iters)))
    steps_per_epoch = math.ceil(len(trainer.train_loader) / trainer.config.accumulate)  # optimizer steps
    callback = pruning.ADMMCallback(admm, job.epochs_per_iter * steps_per_epoch)
    trainer.callbacks.append(callback)
    trainer.fit()
    write_json_on_main(folder / "admm_residuals.json", callback.history)
    return admm.hard_prune()


def prune_stage(ctx: RunContext, sparsity: float, folder: Path) -> tuple[torch.nn.Module, pruning.Masks]:
    """Stages 2-3: the pruning method, then the hard prune (saved to ``hard_prune.pt``)."""
    state_path = folder / "hard_prune.pt"
    if distributed.broadcast_object(state_path.is_file()):        # rank 0's view, as for every stage
        return load_state(state_path, ctx)
    model = ctx.load_model()
    method = pruning.pruning_method(ctx.job.method)
    if method.kind == "admm":
        masks = run_admm(ctx, model, sparsity, folder)
    else:
        masks = pruning.magnitude_prune(model, sparsity, scope=method.scope,
                                        include=ctx.job.include, exclude=ctx.job.exclude,
                                        min_density=ctx.job.min_density)
    ctx.recalibrate_batchnorm(model)
    save_state(state_path, model.cpu(), masks.to("cpu"))
    return model, masks


def retrain_stage(ctx: RunContext, model: torch.nn.Module, masks: pruning.Masks, sparsity: float,
                  folder: Path) -> torch.nn.Module:
    """Stage 4: masked retraining (saved to ``retrained.pt``)."""
    state_path = folder / "retrained.pt"
    if distributed.broadcast_object(state_path.is_file()):
        return load_state(state_path, ctx)[0]
    admm = pruning.pruning_method(ctx.job.method).kind == "admm"
    epochs = ctx.job.retrain_epochs + (0 if admm else ctx.job.admm_epochs)   # the same budget for every method
    if epochs > 0:
        seed_phase(ctx.job.seed, sparsity, "retrain")
        config = ctx.train_config(epochs, folder / "retrain")
        trainer = build_detector_trainer(model, ctx.train, None, config)
        masks.to(trainer.device)
        trainer.callbacks.append(pruning.MaskCallback(masks))
        trainer.fit()
        ctx.recalibrate_batchnorm(model)
    save_state(state_path, model.cpu(), masks.to("cpu"))
    return model


def exported_files_exist(report: dict[str, Any], folder: Path) -> bool:
    """Whether every file an export report names (`path`; `weights`, `cfg`, `names`) is still in
    `folder` (by name: the run folder may have moved, or the report's paths be relative to another
    working folder)."""
    return all((folder / Path(report[key]).name).is_file() for key in ("path", "weights", "cfg", "names")
               if key in report)


def sparsity_folder_name(sparsity: float) -> str:
    """``sparsity_<s>`` with Python's shortest exact repr of ``s`` (0.8 -> ``sparsity_0.8``): one
    folder per distinct value, so no two runs of a sweep can share one."""
    return f"sparsity_{float(sparsity)!r}"


def run_sparsity(ctx: RunContext, sparsity: float, dense: dict[str, Any]) -> dict[str, Any]:
    """Stages 2-5 for one target sparsity, in ``<out>/sparsity_<s>/``; returns its results."""
    folder = ctx.root / sparsity_folder_name(sparsity)
    folder.mkdir(parents=True, exist_ok=True)
    finished = stage_done(folder / "results.json")
    done = {} if finished is None else {name: report for name, report in finished["exports"].items()
                                        if not isinstance(report, dict)
                                        or exported_files_exist(report, folder / "export")}
    done = distributed.broadcast_object(done)          # rank 0's view: every rank takes the same stages
    if finished is not None and set(ctx.job.export) <= set(done):
        return finished          # else a rerun asks for formats it has not written (or whose files are gone)
    started = time.perf_counter()
    model, masks = prune_stage(ctx, sparsity, folder)
    hard = stage_done(folder / "hard_prune.json") or ctx.record("hard_prune", model, folder, masks)
    model = retrain_stage(ctx, model, masks, sparsity, folder)
    retrained = stage_done(folder / "retrained.json") or ctx.record("retrained", model, folder, masks)
    rows = pruning.layer_table(model, masks)
    write_json_on_main(folder / "layers.json", rows)
    exports = {}
    if distributed.is_main():
        pruning.save_kept_fraction_plot(rows, folder / "layers.png",
                                        f"{ctx.job.method}: {100 * retrained['sparsity']:.1f}% of weights removed")
        missing = [name for name in ctx.job.export if name not in done]
        exports = {**done, **(export_model(model.cpu().eval(), folder / "export", missing, masks=masks.to("cpu"),
                                           img_size=ctx.size, stem="pruned") if missing else {})}
        if exports:
            atomic_write_json(folder / "export" / "export.json", exports)    # as detect export writes one
    earlier_wall_s = finished["wall_time_s"] if finished is not None else 0.0      # a rerun's first run
    results = {"target_sparsity": sparsity, "method": ctx.job.method, "stages": [dense, hard, retrained],
               "exports": exports, "wall_time_s": earlier_wall_s + time.perf_counter() - started}
    write_json_on_main(folder / "results.json", results)
    return results


def format_stage_table(sweep: list[dict[str, Any]]) -> str:
    """The stage records of every sparsity as a plain-text table."""
    header = (f"{'target':>7} {'stage':<11} {'mAP50-95':>9} {'mAP50':>7} {'nonzero':>10} {'sparsity':>9} "
              f"{'compact':>10} {'CPU ms':>7}")
    lines = [header, "-" * len(header)]
    for result in sweep:
        for record in result["stages"]:
            lines.append(f"{result['target_sparsity']:>7.2f} {record['stage']:<11} {record['map50_95']:>9.4f} "
                         f"{record['map50']:>7.4f} {record['nonzero_prunable']:>10,d} "
                         f"{100 * record['sparsity']:>8.2f}% {record['compact_bytes'] / 1024:>7.1f}KiB "
                         f"{record['cpu_latency_ms']:>7.2f}")
    return "\n".join(lines)


def save_sweep_plot(sweep: list[dict[str, Any]], path: Path, method: str) -> Path:
    """mAP50 and mAP50-95 of the retrained models against their measured sparsity (PNG, atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 3.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = sorted((r["stages"][-1]["sparsity"], r["stages"][-1]) for r in sweep)
    dense = sweep[0]["stages"][0]
    for key, label in (("map50", "mAP50"), ("map50_95", "mAP50-95")):
        line, = axes.plot([100 * s for s, _ in points], [rec[key] for _, rec in points], "o-", label=label)
        axes.axhline(dense[key], color=line.get_color(), linestyle=":", linewidth=1)
    axes.set_xlabel("weights removed (%)")
    axes.set_ylabel("COCO mAP (dotted: dense)")
    axes.set_title(method)
    axes.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return atomic_write_bytes(path, png.getvalue())


def check_weight_patterns(job: PruneJob) -> None:
    """The job's parameter-name patterns (include, exclude, min_density, layer_sparsity) and floors
    against the cfg's model, before any work: a pattern that matches nothing, or floors above the
    budget, fail now, not after the dense stage (whose record would then lock the run folder)."""
    with torch.device("meta"):                           # names and shapes only: no memory, no random draws
        model = detector.load_darknet(job.cfg)
    pruning.check_selection(model, job.sparsity, pruning.pruning_method(job.method).scope == "global",
                            job.include, job.exclude, job.min_density,
                            job.layer_sparsity if job.method == "admm-layerwise" else None)


def check_job(job: PruneJob) -> None:
    """What can be refused before the run folder is made or written: an export that this OpenCV
    cannot check, the training options of the cfg's last [yolo] (`check_training_options`), the
    weight patterns and floors (`check_weight_patterns`), and missing weights or data."""
    cfg = detector.parse_cfg(job.cfg)
    if "darknet" in job.export:  # fail before the training, not after it
        require_opencv_darknet_importer(cfg)
    check_training_options(cfg, job.img_size, job.augment, job.multi_scale)
    check_weight_patterns(job)
    check_input_paths(job)


def check_input_paths(job: PruneJob) -> None:
    """That the job's weights and data are there, before a run folder is made for them (reading
    them comes later, in the run)."""
    expected = {"weights": "file", "data": "file", "train_images": "folder", "train_annotations": "file",
                "val_images": "folder", "val_annotations": "file"}
    for setting, kind in expected.items():
        path = getattr(job, setting)
        if path is not None and not (Path(path).is_dir() if kind == "folder" else Path(path).is_file()):
            found = "a folder" if Path(path).is_dir() else "a file" if Path(path).exists() else "nothing"
            raise FileNotFoundError(f"{path}: expected the {kind} of the job's {setting}, found {found}")


def make_context(job: PruneJob) -> RunContext:
    root = Path(job.out)
    train, val = load_sources(job)
    cfg = detector.parse_cfg(job.cfg)
    heads = [layer for layer in cfg.layers if layer.kind == "yolo"]
    if heads:  # before the dense evaluation, not after it
        check_classes(job.cfg, heads[0].classes, train, val)
    if job.data is None:                # two COCO jsons: their categories may differ
        check_same_classes(train.class_names, str(job.train_annotations), val.class_names, str(job.val_annotations))
    if "darknet" in job.export:  # its .names file: refused now, not after the training
        check_class_names(train.class_names, str(job.data or job.train_annotations))
    net = cfg.net
    size = training_side(cfg, job.img_size)
    letterbox = bool(net.letter_box)
    device = resolve_device(job.device)     # under torchrun, cuda is this rank's GPU (init_from_env set it)
    evaluator = ValidationMap(val, size, letterbox, batch_size=8, workers=job.workers, device=device)
    return RunContext(job, root, train, val, evaluator, size, letterbox, device)


RESUMABLE_CHANGES = {"out", "workers", "device", "progress", "latency_runs", "export"}  # a finished run exports anew
                                                                                        # for a format it lacks
PATH_SETTINGS = {"cfg", "weights", "data", "train_images", "train_annotations", "val_images", "val_annotations", "out"}


def write_or_check_config(job: PruneJob, path: Path) -> None:
    """Write the job's settings to ``path``; when a run there already finished a stage (a resume),
    its settings must be the same, except those in RESUMABLE_CHANGES. (A run that failed before
    finishing any stage, on bad input say, may be run again with corrected settings.) Paths are
    written and compared absolute; the number of processes is recorded too (it sets the optimizer
    steps per epoch, and so when the ADMM updates come), a folder from before that as 1. Under
    torchrun, rank 0's record decides: a refusal is an `engine.distributed.EveryRankError`, said once."""
    settings = {**resolved_paths(asdict(job), PATH_SETTINGS), RECORDED_ONLY: distributed.world_size()}
    distributed.raise_on_every_rank(config_problem(settings, path) if distributed.is_main() else None)
    if distributed.is_main():
        atomic_write_bytes(path, yaml.safe_dump(settings, sort_keys=False).encode("utf-8"))


def config_problem(settings: dict[str, Any], path: Path) -> str | None:
    """What refuses `settings` in the run folder of the config.yaml at ``path``, or None."""
    if not (path.is_file() and (path.parent / "dense.json").is_file()):
        return None
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        recorded = f"a file YAML cannot read ({str(error).splitlines()[0]})"
    if not isinstance(recorded, dict):
        found = recorded if isinstance(recorded, str) else f"a YAML {type(recorded).__name__}"
        return f"{path}: expected the settings this run recorded, found {found}; restore it, or choose another --out"
    before = resolved_paths(recorded, PATH_SETTINGS)                                  # older runs: as given
    before.setdefault(RECORDED_ONLY, 1)
    changed = changed_settings(before, settings, ignore=RESUMABLE_CHANGES)
    if [name for name, _, _ in changed] == [RECORDED_ONLY]:
        return (f"{path}: this run folder holds a run of {changed[0][1]} processes, and this command runs "
                f"{changed[0][2]} (they set its optimizer steps); resume it with torchrun --nproc_per_node "
                f"{changed[0][1]}, or export a finished sparsity in one process with detect export --checkpoint "
                f"{path.parent}/sparsity_S/retrained.pt")
    if changed:
        return (f"{path}: this run folder holds a run with other settings ({describe_changes(changed)}); "
                f"resume with the same settings or choose another --out")
    return None


def log_to_file(path: Path) -> logging.Handler:
    """Append the pipeline's log to `path` (a symbolic link there is replaced by the file, as at
    every output path, so that the log never goes into the file it points at)."""
    if path.is_symlink():
        path.unlink()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    return handler


def run_job(job: PruneJob) -> dict[str, Any]:
    """Run (or resume) the whole job; writes ``<out>/config.yaml``, ``log.txt``, ``results.json``
    and the per-sparsity folders, and returns the results. Holds ``<out>`` meanwhile
    (`engine.run_folder_lock`): a second job on the same folder is refused."""
    distributed.init_from_env(resolve_device(job.device))  # joins torchrun's group, if any
    with distributed.checked_on_every_rank():             # bad input: said once, not by every rank
        check_job(job)
        root = output_folder(job.out, "--out")
    torch.manual_seed(job.seed)
    with run_folder_lock(root, "--out"):
        write_or_check_config(job, root / "config.yaml")
        if distributed.is_main():                            # what writes a kill cut short left
            remove_stale_temp_files(root, recursive=True)
        handler = log_to_file(root / "log.txt") if distributed.is_main() else None
        try:
            if distributed.is_main():
                processes = distributed.world_size()
                LOG.info("%s %s: %s, %d process%s", "resuming" if stage_records(root) else "starting", root,
                         job.method, processes, "" if processes == 1 else "es")
            return _run_stages(job)
        finally:
            if handler is not None:
                LOG.removeHandler(handler)
                handler.close()


def stage_records(root: Path) -> list[Path]:
    """The stage records and checkpoints an earlier run left in ``root`` (what a rerun resumes from)."""
    return [path for pattern in ("dense.json", "sparsity_*/*.json", "sparsity_*/*.pt", "sparsity_*/*/epoch_*.pt")
            for path in root.glob(pattern)]


def _run_stages(job: PruneJob) -> dict[str, Any]:
    with distributed.checked_on_every_rank():
        ctx = make_context(job)
    started = time.perf_counter()
    dense = stage_done(ctx.root / "dense.json")
    if dense is None:
        with distributed.checked_on_every_rank():          # the weights file is first read here
            model = ctx.load_model()
        dense = ctx.record("dense", model, ctx.root)
    sweep = [run_sparsity(ctx, float(s), dense) for s in job.sparsity]
    if len(sweep) > 1 and distributed.is_main():
        save_sweep_plot(sweep, ctx.root / "map_vs_sparsity.png", job.method)
    results = {"cfg": job.cfg, "weights": job.weights, "method": job.method, "dense": dense, "sweep": sweep,
               "wall_time_s": time.perf_counter() - started}
    write_json_on_main(ctx.root / "results.json", results)
    return results
