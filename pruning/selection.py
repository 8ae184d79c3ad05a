"""Which parameters are prunable, and per-name settings chosen by patterns.

By default the ``weight`` of every convolution (1d/2d/3d, transposed too) and ``nn.Linear``;
biases and normalisation parameters never. A weight that is not a Parameter of such a module is
not selected: a conv under ``parametrizations.weight_norm`` (its weight is computed), the input
projection of ``nn.MultiheadAttention`` (``in_proj_weight``). Names are canonical: wrapper prefixes added by
DistributedDataParallel / DataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``) are
stripped, so the same names address a bare model, a wrapped one and its EMA copy.

Patterns match canonical parameter names: a glob (``fnmatch``, e.g. ``"backbone.*.weight"``) or,
with the prefix ``re:``, a regular expression searched in the name (``"re:^head\\."``).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

from torch import nn

from pruning.projection import floor_counts, kept_count

PRUNABLE_MODULE_TYPES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """Strip leading wrapper prefixes: ``"module._orig_mod.conv.weight"`` -> ``"conv.weight"``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    return name


def name_matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` (glob, or ``re:`` + regex searched in the name) matches ``name``.

    Raises:
        ValueError: a ``re:`` pattern that is not a regular expression.
    """
    if pattern.startswith("re:"):
        try:
            return re.search(pattern[3:], name) is not None
        except re.error as err:
            raise ValueError(f"pattern {pattern!r}: expected a regular expression after 're:', found one that "
                             f"does not compile ({err})") from None
    return fnmatchcase(name, pattern)


def as_patterns(patterns: str | Iterable[str] | None, what: str) -> list[str]:
    """`patterns` as a list of strings (one string is one pattern; None: none); ValueError naming
    `what` for an entry that is not a string."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{what} patterns must be strings, got {pattern!r}")
    return patterns


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """All parameters of ``model`` keyed by canonical name (shared parameters listed once).

    Raises:
        ValueError: two parameters share a canonical name (say ``module.fc.weight`` of a child
            named ``module`` and the model's own ``fc.weight``).
    """
    named, raw_name = {}, {}
    for name, param in model.named_parameters():
        key = canonical_name(name)
        if key in named:
            raise ValueError(f"{type(model).__name__}: parameters {raw_name[key]!r} and {name!r} are both "
                             f"{key!r} once the wrapper prefixes {', '.join(_WRAPPER_PREFIXES)} are left out; "
                             f"rename the child module")
        named[key], raw_name[key] = param, name
    return named


def prunable_parameters(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, nn.Parameter]:
    """The weights to prune, in model order, keyed by canonical name.

    Args:
        model: any module, possibly wrapped by DDP/DataParallel/torch.compile.
        include: patterns; if given, only default candidates matching one of them are kept.
            A pattern that matches no candidate is an error (catches typos).
        exclude: patterns; candidates matching one of them are dropped. A pattern that matches no
            candidate is an error too: a typo there would prune what it meant to protect.
    Returns:
        dict canonical name -> Parameter, non-empty; a weight tied into several modules appears
        once, under its name in ``canonical_parameters`` (its first name in ``named_parameters``,
        which may be a module that is not Conv/Linear, such as a tied embedding).
    Raises:
        ValueError: no prunable parameter is left, or an include or exclude pattern matches nothing.
    """
    include_patterns = as_patterns(include, "include")
    exclude_patterns = as_patterns(exclude, "exclude")
    name_of = {id(param): name for name, param in canonical_parameters(model).items()}
    candidates = {}
    for module in model.modules():                                # shared modules are listed once
        weight = getattr(module, "weight", None)
        if isinstance(module, PRUNABLE_MODULE_TYPES) and isinstance(weight, nn.Parameter):
            candidates[name_of[id(weight)]] = weight              # a tied weight: one entry, one name
    for what, patterns in (("include", include_patterns), ("exclude", exclude_patterns)):
        for pattern in patterns:
            if not any(name_matches(name, pattern) for name in candidates):
                raise ValueError(
                    f"{what} pattern {pattern!r} matches no Conv/Linear weight of {type(model).__name__}"
                    f" (candidates: {_preview(candidates)})"
                )
    selected = {
        name: param for name, param in candidates.items()
        if (not include_patterns or any(name_matches(name, p) for p in include_patterns))
        and not any(name_matches(name, p) for p in exclude_patterns)
    }
    if not selected:
        raise ValueError(
            f"no prunable parameters in {type(model).__name__}: expected Conv/Linear weights"
            f" (include={include_patterns or None}, exclude={exclude_patterns or None});"
            f" found {len(candidates)} candidate(s)"
        )
    return selected


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names)} in all)"
    return shown


def per_name_values(
    names: Sequence[str], values: float | Mapping[str, float], default: float, what: str
) -> list[float]:
    """Resolve a setting per parameter name.

    Args:
        names: canonical parameter names.
        values: one number for all names, or a mapping pattern -> number where the first
            matching pattern wins and unmatched names get ``default``.
        default: value for names no pattern matches.
        what: the setting's name, for error messages.
    Returns:
        list of floats aligned with ``names``.
    Raises:
        ValueError: a pattern of the mapping matches none of ``names``.
    """
    if not isinstance(values, Mapping):
        return [float(values)] * len(names)
    for pattern in values:
        if not any(name_matches(name, pattern) for name in names):
            raise ValueError(f"{what} pattern {pattern!r} matches no prunable parameter ({_preview(names)})")
    resolved = []
    for name in names:
        match = next((pattern for pattern in values if name_matches(name, pattern)), None)
        resolved.append(default if match is None else float(values[match]))
    return resolved


def layer_floors(params: Mapping[str, nn.Parameter], min_density: float | Mapping[str, float]) -> list[int]:
    """Minimum kept entries per parameter from ``min_density`` (a number, or pattern -> density).

    Returns:
        list of ints aligned with ``params``: ``ceil(density * numel)``, at least 1 when density > 0.
    """
    densities = per_name_values(list(params), min_density, 0.0, "min_density")
    return floor_counts([param.numel() for param in params.values()], densities)


def check_selection(model: nn.Module, sparsities: Iterable[float], global_budget: bool,
                    include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
                    min_density: float | Mapping[str, float] = 0.0,
                    layer_sparsity: Mapping[str, float] | None = None) -> None:
    """What ``ADMM`` and ``magnitude_prune`` would refuse, from names and shapes alone (a model on
    the meta device will do), so that a run fails before any work: include/exclude, min_density or
    layer_sparsity patterns that match no prunable weight, a sparsity that keeps no weight, and
    per-layer floors above a global budget (``global_budget``: one top-k over all layers) at any
    of ``sparsities``."""
    named = prunable_parameters(model, include, exclude)
    per_layer_floors = layer_floors(named, min_density)
    floors = sum(per_layer_floors)
    if layer_sparsity:
        per_name_values(list(named), layer_sparsity, 0.0, "layer_sparsity")
    total = sum(param.numel() for param in named.values())
    numels = [param.numel() for param in named.values()]
    for sparsity in sparsities:
        budget = kept_count(total, sparsity)
        if global_budget and budget == 0 and not floors:
            raise keeps_no_weight(total, sparsity)
        if not global_budget:
            ratios = per_name_values(list(named), layer_sparsity or {}, sparsity, "layer_sparsity")
            if not any(layerwise_kept(numels, ratios, per_layer_floors)):
                raise keeps_no_weight(total, sparsity, layer_sparsity)
        if global_budget and floors > budget:
            raise ValueError(f"min_density keeps {floors} weights at least, more than the {budget} of {total} "
                             f"that sparsity {sparsity} leaves")
        if not global_budget:
            warn_floors_above_ratios(named, sparsity, min_density, layer_sparsity)


def layerwise_kept(numels: Sequence[int], ratios: Sequence[float], floors: Sequence[int]) -> list[int]:
    """What per-layer pruning keeps of each layer: the count its ratio keeps, or its floor where
    that is more."""
    return [max(kept_count(numel, ratio), floor) for numel, ratio, floor in zip(numels, ratios, floors)]


def keeps_no_weight(total: int, sparsity: float, layer_sparsity: Mapping[str, float] | None = None) -> ValueError:
    """The error for a setting that would keep none of the `total` prunable weights."""
    which = f"layer_sparsity {dict(layer_sparsity)} (else sparsity {sparsity})" if layer_sparsity else \
        f"sparsity {sparsity}"
    return ValueError(f"{which} keeps none of the {total} prunable weights; expected a sparsity that keeps at least one")


def warn_floors_above_ratios(named: Mapping[str, nn.Parameter], sparsity: float,
                             min_density: float | Mapping[str, float],
                             layer_sparsity: Mapping[str, float] | None) -> None:
    """Per-layer pruning keeps each layer's floor where it is above what the layer's ratio keeps:
    warn, naming the layers, since the model then keeps more than the ratios say."""
    numels = [param.numel() for param in named.values()]
    ratios = per_name_values(list(named), layer_sparsity or {}, sparsity, "layer_sparsity")
    by_ratio = [kept_count(numel, ratio) for numel, ratio in zip(numels, ratios)]
    floors = layer_floors(named, min_density)
    above = [name for name, kept, floor in zip(named, by_ratio, floors) if floor > kept]
    if above:
        kept = sum(layerwise_kept(numels, ratios, floors))
        warnings.warn(f"min_density keeps more than the layer's sparsity leaves in {len(above)} layer(s) "
                      f"({', '.join(above[:3])}{', ...' if len(above) > 3 else ''}): there the floor wins, so "
                      f"{kept} of {sum(numels)} weights are kept, not the {sum(by_ratio)} the ratios leave "
                      f"(sparsity {sparsity})", stacklevel=3)
