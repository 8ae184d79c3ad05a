"""The settings of one `detect prune` run (`PruneJob`): defaults, a YAML file, the CLI's flags, and
their checks, so that a bad setting stops the job before any work (and before the run folder
records it)."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import yaml

import pruning
from data.sources import read_utf8
from detector.export import FORMATS as EXPORT_FORMATS

METHODS = tuple(pruning.METHODS)
RECORDED_ONLY = "processes"     # what a run folder's config.yaml adds: the number of processes that ran


@dataclass
class PruneJob:
    """Everything one `detect prune` run needs. A YAML config's keys are these names, and each
    command-line flag is one of them with '-' for '_'; ``layer_sparsity``, ``augment``, ``mosaic``,
    ``multi_scale``, ``amp`` and ``latency_runs`` are set in the YAML only.

    Which weights: ``include``/``exclude`` are parameter-name patterns (globs, or ``re:`` regexes;
    default every conv weight), ``min_density`` keeps at least that fraction of every layer (a
    number, or a mapping of parameter-name patterns to numbers).

    Data: ``data`` (an Ultralytics data.yaml with train and val splits), or the COCO json pairs
    ``train_images``/``train_annotations`` and ``val_images``/``val_annotations``.
    """

    cfg: str = ""
    weights: str | None = None
    data: str | None = None
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    out: str = "runs/prune"
    sparsity: list[float] = field(default_factory=lambda: [0.8])
    method: str = "admm-global"
    layer_sparsity: dict[str, float] | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    min_density: float | dict[str, float] = 0.0
    admm_iters: int = 4
    epochs_per_iter: int = 2
    rho: float = 1e-3
    rho_mult: float = 2.0
    rho_max: float = 1e-1
    ramp_from: float | None = None
    ramp_iters: int | None = None
    retrain_epochs: int = 4
    lr: float | None = None
    burn_in: int | None = 0
    batch_size: int | None = None
    img_size: int | None = None
    augment: bool = True
    mosaic: float | None = 0.0
    multi_scale: bool = False
    workers: int = 0
    device: str | None = None
    amp: bool = True
    bn_images: int = 256
    export: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    latency_runs: int = 10
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.cfg:
            raise ValueError("prune: a Darknet cfg is required (--cfg or `cfg:` in the YAML config)")
        self.sparsity = [_number("sparsity", value, float) for value in _as_list(self.sparsity)]
        if not self.sparsity:
            raise ValueError("sparsity: expected at least one value in [0, 1), found none")
        self.export = [str(value) for value in _as_list(self.export if self.export is not None else [])]
        _check_settings(self)
        for value in self.sparsity:
            pruning.check_sparsity(value)
        repeated = sorted(value for value, count in Counter(self.sparsity).items() if count > 1)
        if repeated:
            raise ValueError(f"sparsity lists {', '.join(map(repr, repeated))} more than once; each value is one run")
        method = pruning.pruning_method(self.method)
        unknown = sorted(set(self.export) - set(EXPORT_FORMATS))
        if unknown:
            raise ValueError(f"unknown export format(s) {unknown}; expected some of {', '.join(EXPORT_FORMATS)}")
        if self.img_size is not None and self.img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32, found {self.img_size}")
        if self.layer_sparsity and self.method != "admm-layerwise":
            raise ValueError(f"layer_sparsity is for method admm-layerwise; method {self.method!r} would ignore it")
        for pattern, value in (self.layer_sparsity or {}).items():
            pruning.check_sparsity(value, f"layer_sparsity[{pattern!r}]")
        if self.ramp_from is not None and method.kind != "admm":
            raise ValueError(f"ramp_from is for the ADMM methods; method {self.method!r} prunes at once")
        for value in self.sparsity:
            pruning.ramp_updates(value, self.ramp_from, self.ramp_iters, self.admm_iters)  # validates
        coco = {"train_images": self.train_images, "train_annotations": self.train_annotations,
                "val_images": self.val_images, "val_annotations": self.val_annotations}
        if self.data is not None and any(coco.values()):
            raise ValueError(f"prune: give --data data.yaml or the COCO json options, not both: data is {self.data}, "
                             f"{', '.join(f'{key} {value}' for key, value in coco.items() if value)}")
        if self.data is None and not all(coco.values()):
            raise ValueError("prune: give --data data.yaml, or all of --train-images/--train-annotations/"
                             "--val-images/--val-annotations (COCO json)")

    @property
    def admm_epochs(self) -> int:
        return self.admm_iters * self.epochs_per_iter

    @classmethod
    def from_sources(cls, yaml_path: str | os.PathLike | None, overrides: dict[str, Any]) -> "PruneJob":
        """Defaults, then the YAML file's keys, then the non-None ``overrides`` (the CLI flags)."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(read_job_yaml(yaml_path))
        values.update({key: value for key, value in overrides.items() if value is not None})
        try:
            return cls(**values)
        except ValueError as error:
            if yaml_path is None:
                raise
            raise ValueError(f"{yaml_path} (or a flag over it): {error}") from None


class NumberSetting(NamedTuple):
    """What a numeric setting of `PruneJob` may hold."""

    kind: type                   # int or float
    low: float | None = None     # smallest value (None: no bound)
    low_inclusive: bool = True   # False: values must be above `low`
    high: float | None = None    # largest value (None: no bound)
    optional: bool = False       # None allowed (a default from the cfg, or "off")


NUMBER_SETTINGS: dict[str, NumberSetting] = {
    "admm_iters": NumberSetting(int, 1), "epochs_per_iter": NumberSetting(int, 1),
    "retrain_epochs": NumberSetting(int, 0), "ramp_iters": NumberSetting(int, 1, optional=True),
    "rho": NumberSetting(float, 0.0, low_inclusive=False, high=pruning.RHO_LIMIT),
    "rho_mult": NumberSetting(float, 1.0),
    "rho_max": NumberSetting(float, 0.0, low_inclusive=False, high=pruning.RHO_LIMIT),
    "ramp_from": NumberSetting(float, 0.0, high=1.0, optional=True),
    "lr": NumberSetting(float, 0.0, low_inclusive=False, optional=True),
    "burn_in": NumberSetting(int, 0, optional=True), "batch_size": NumberSetting(int, 1, optional=True),
    "img_size": NumberSetting(int, 32, optional=True), "mosaic": NumberSetting(float, 0.0, high=1.0, optional=True),
    "workers": NumberSetting(int, 0), "latency_runs": NumberSetting(int, 1), "bn_images": NumberSetting(int, 0),
    "seed": NumberSetting(int),
}
BOOL_SETTINGS = ("augment", "multi_scale", "amp", "progress")


def _as_list(value: Any) -> list:
    """A list setting given as one value or a comma-separated string ("0.5,0.7") becomes a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _number(name: str, value: Any, kind: type) -> int | float:
    """``value`` (a number, or its text from YAML) as ``kind``; ValueError naming the setting otherwise."""
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be {what}, found {value!r}")
    if kind is int and isinstance(value, int):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be {what}, found {value!r}") from None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise ValueError(f"{name} must be {'a whole number' if kind is int else 'a finite number'}, found {value!r}")
    return int(number) if kind is int else number


def _bounds(setting: NumberSetting) -> str:
    """The allowed range in words, e.g. "> 0.0" or ">= 0.0 and <= 1.0"."""
    low = [f"{'>=' if setting.low_inclusive else '>'} {setting.low}"] if setting.low is not None else []
    return " and ".join(low + ([f"<= {setting.high}"] if setting.high is not None else []))


def _check_settings(job: "PruneJob") -> None:
    """Types and ranges of the numeric and boolean settings, so that a bad one stops the job before
    any work (and before the run folder records it)."""
    for name, setting in NUMBER_SETTINGS.items():
        value = getattr(job, name)
        if value is None and setting.optional:
            continue
        number = _number(name, value, setting.kind)
        above_low = setting.low is None or (number >= setting.low if setting.low_inclusive else number > setting.low)
        if not above_low or (setting.high is not None and number > setting.high):
            raise ValueError(f"{name} must be {_bounds(setting)}, found {value!r}")
        setattr(job, name, number)
    densities = job.min_density.values() if isinstance(job.min_density, dict) else [job.min_density]
    for density in densities:                            # a number, or pattern -> number
        if not 0.0 <= _number("min_density", density, float) <= 1.0:
            raise ValueError(f"min_density must be in [0, 1] (or a mapping of patterns to such numbers), found "
                             f"{job.min_density!r}")
    for name in BOOL_SETTINGS:
        if not isinstance(getattr(job, name), bool):
            raise ValueError(f"{name} must be true or false, found {getattr(job, name)!r}")


def read_job_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML job config; unknown keys are an error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(read_utf8(path)) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings, found {type(values).__name__}")
    values.pop(RECORDED_ONLY, None)         # a run folder's config.yaml records it; no setting
    known = {f.name for f in fields(PruneJob)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}; known settings: {', '.join(sorted(known))}")
    return values
