"""A `--checkpoint-dir` holds one run: `run.json` records its settings, and only the same run resumes.

Without this a new run written into a used folder mixes with the old run's checkpoints (the trainer
keeps the newest by epoch, so the old ones win), and `--resume` with other settings continues a run
that is not the one asked for: another sparsity, method, optimizer or number of epochs.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from classify.pipeline import OPTIMIZERS, PruneSettings, TrainSettings, model_spec, settings_dict
from engine import atomic_write_json, changed_settings, describe_changes, distributed

RUN_RECORD = "run.json"
UNRECORDED = "(not recorded)"
# May differ on resume: where and how fast it runs, what it shows, and the resume flags themselves.
# (The output files, --out and --json-out, are not part of a run's identity either.)
RESUMABLE_SETTINGS = ("device", "workers", "progress", "eval_every", "resume", "checkpoint_dir")


def run_identity(mode: str, model_name: str, data: str | Path, weights: str | Path | None,
                 settings: TrainSettings, prune: PruneSettings | None = None) -> dict[str, Any]:
    """What makes a run this run, as JSON values: mode, model, data and starting weights (as
    absolute paths, and the weights' SHA-256: a file replaced at the same path is another run), the
    settings as used (a default spelled out is the same run) and the number of processes."""
    spec = model_spec(model_name)
    train = {key: value for key, value in settings_dict(settings).items() if key not in RESUMABLE_SETTINGS}
    train["optimizer"] = settings.optimizer or spec.optimizer
    train["lr"] = settings.lr or OPTIMIZERS[train["optimizer"]]
    train["batch_size"] = settings.batch_size or spec.batch_size
    identity = {"mode": mode, "model": model_name, "data": str(Path(data).resolve()),
                "weights": None if weights is None else str(Path(weights).resolve()),
                "weights_sha256": None if weights is None else file_sha256(Path(weights)), "train": train,
                "prune": None if prune is None else asdict(prune), "processes": distributed.world_size()}
    return json.loads(json.dumps(identity))     # tuples as lists, as they come back from run.json


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of the file at `path` (None where there is none: loading it reports that)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def claim_checkpoint_dir(settings: TrainSettings, identity: dict[str, Any]) -> None:
    """Before any training, when `settings.checkpoint_dir` is set: a new run needs a folder without
    checkpoints, and `settings.resume` needs one whose run.json records the same `identity` (up to
    `RESUMABLE_SETTINGS`; a folder of checkpoints without run.json, from before it existed, is
    resumed with a warning). Then writes run.json. Rank 0 looks; every rank raises.

    Raises:
        ValueError: naming the folder, and the settings that differ.
    """
    if settings.checkpoint_dir is None:
        return
    folder = Path(settings.checkpoint_dir)
    problem = None
    if distributed.is_main():
        problem = _problem(folder, settings.resume, identity)
        if problem is None:
            if settings.resume and not any(folder.glob("*/epoch_*.pt")):
                warnings.warn(f"--resume, but {folder} holds no checkpoint yet: the run starts from its beginning",
                              stacklevel=2)
            elif settings.resume and not (folder / RUN_RECORD).is_file():
                warnings.warn(f"{folder} has no {RUN_RECORD} (written since 2026-11-26): resuming its checkpoints "
                              f"without checking that they are of a run with these settings", stacklevel=2)
            atomic_write_json(folder / RUN_RECORD, identity)
    distributed.raise_on_every_rank(problem)


def _problem(folder: Path, resume: bool, identity: dict[str, Any]) -> str | None:
    checkpoints = sorted(folder.glob("*/epoch_*.pt"))
    if not checkpoints:
        return None
    newest = checkpoints[-1].relative_to(folder)
    if not resume:
        return (f"--checkpoint-dir {folder}: holds the checkpoints of an earlier run ({newest}); "
                f"continue it with --resume, or choose another folder")
    record = folder / RUN_RECORD
    if not record.is_file():
        return None                             # an older run's folder: resumed with a warning
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{record}: unreadable ({error}); choose another --checkpoint-dir"
    saved = with_later_defaults(saved)
    if saved["weights_sha256"] == UNRECORDED:                  # run.json from before the hash: not compared
        saved["weights_sha256"] = identity["weights_sha256"]
    changed = changed_settings(saved, identity)
    if changed:
        details = describe_changes(changed)
        return (f"--checkpoint-dir {folder}: holds a run with other settings ({details}); "
                f"resume it with the same settings, or choose another folder")
    return None


def with_later_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the settings added since it was written at their defaults, so that a version
    with a new option still resumes a run that did not have it."""
    saved = {"processes": 1, **saved}
    saved.setdefault("weights_sha256", UNRECORDED)
    for section, settings in (("train", TrainSettings), ("prune", PruneSettings)):
        if isinstance(saved.get(section), dict):
            defaults = {f.name: f.default for f in fields(settings) if f.default is not MISSING}
            saved[section] = json.loads(json.dumps({**defaults, **saved[section]}))
    return saved
