"""The shared training engine: one loop with hooks, AMP, EMA, accumulation, checkpoints, resume and DDP."""
from engine import distributed
from engine.checkpoint import (atomic_torch_save, atomic_write, atomic_write_bytes, atomic_write_json,
                               find_latest_checkpoint, load_checkpoint, load_error_summary, remove_stale_temp_files,
                               save_checkpoint, unreadable_detail)
from engine.ema import ModelEMA
from engine.interrupts import held_interrupts, held_iteration
from engine.output_paths import output_file, output_folder, refuse_overwriting_inputs
from engine.rng import seed_everything, seeded_cpu_stream
from engine.run_lock import run_folder_lock
from engine.run_settings import changed_settings, describe_changes, resolved_paths
from engine.distributed import resolve_device
from engine.trainer import NonFiniteLossError, Trainer, TrainConfig, move_to_device

__all__ = [
    "ModelEMA",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "changed_settings",
    "describe_changes",
    "distributed",
    "find_latest_checkpoint",
    "held_interrupts",
    "held_iteration",
    "load_checkpoint",
    "load_error_summary",
    "output_file",
    "output_folder",
    "refuse_overwriting_inputs",
    "move_to_device",
    "remove_stale_temp_files",
    "resolve_device",
    "resolved_paths",
    "run_folder_lock",
    "save_checkpoint",
    "seed_everything",
    "seeded_cpu_stream",
    "unreadable_detail",
]
