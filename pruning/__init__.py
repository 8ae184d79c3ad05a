"""Model-agnostic pruning core: selection, projections, ADMM, masks, baselines, reports, export.

Imports only torch (matplotlib lazily, for the plot). See docs/contracts.md, section ``pruning``.
"""
from pruning.admm import ADMM, RHO_LIMIT, SCOPES, ADMMConfig, check_minimises, ramp_updates
from pruning.callbacks import ADMMCallback, MaskCallback
from pruning.magnitude import MAGNITUDE_SCOPES, magnitude_prune
from pruning.masks import Masks, pack_mask, unpack_mask
from pruning.methods import METHODS, Method, pruning_method
from pruning.optimizer_hooks import StepHooks, attach_admm, attach_masks
from pruning.projection import (
    check_sparsity,
    floor_counts,
    global_topk_masks,
    kept_count,
    layerwise_topk_masks,
    magnitude_keys,
)
from pruning.report import (PRUNED_ZERO_FRACTION, format_table, layer_table, save_kept_fraction_plot, table_totals,
                            weight_sparsity)
from pruning.selection import canonical_name, check_selection, layer_floors, name_matches, prunable_parameters
from pruning.sparse_archive import check_decoded, entropy_bound, load_sparse_archive, save_sparse_archive
from pruning.ultralytics_callbacks import UltralyticsADMM

__all__ = [
    "ADMM", "ADMMConfig", "RHO_LIMIT", "SCOPES", "check_minimises", "ramp_updates", "ADMMCallback", "MaskCallback",
    "MAGNITUDE_SCOPES", "magnitude_prune",
    "Masks", "pack_mask", "unpack_mask", "METHODS", "Method", "pruning_method", "StepHooks", "attach_admm",
    "attach_masks", "UltralyticsADMM",
    "check_sparsity", "floor_counts", "global_topk_masks", "kept_count",
    "layerwise_topk_masks", "magnitude_keys", "format_table", "layer_table", "save_kept_fraction_plot",
    "PRUNED_ZERO_FRACTION", "weight_sparsity",
    "table_totals", "canonical_name", "check_selection", "layer_floors", "name_matches", "prunable_parameters",
    "check_decoded", "entropy_bound", "load_sparse_archive", "save_sparse_archive",
]
