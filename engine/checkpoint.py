"""Checkpoint files: atomic save, validated load, and finding the newest one in a directory.

A checkpoint is a plain dict written with `torch.save`. Saving goes through a temporary file in
the same directory and `os.replace`, so a crash mid-write never leaves a truncated checkpoint
under the final name: readers see either the old file or the new one.
"""
from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from engine.staging_folder import remove_abandoned_staging_folders, walk_to_sweep
from pruning.atomic_file import TEMP_FILE_PREFIX, remove_unheld, write_atomically

CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)\.pt$")
TEMP_FILE_PATTERN = re.compile(rf"^{re.escape(TEMP_FILE_PREFIX)}.+\.\w{{8}}\.tmp$")   # what atomic_write makes
REQUIRED_KEYS = ("epoch", "step", "model")


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint written after `epoch` completed epochs, e.g. `epoch_0003.pt`."""
    return f"epoch_{epoch:04d}.pt"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: a temporary file beside it (same filesystem), fsync,
    then `os.replace`, so readers see the old file or the new one, never a partial one. The
    temporary file is removed if writing fails; the result gets the usual (umask) permissions."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """`payload` as indented JSON (UTF-8, trailing newline), written atomically."""
    return atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` with `torch.save` to `path` atomically (see `atomic_write_bytes`)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(handle)` on a binary temporary file beside `path`, then fsync and `os.replace`
    it into place (see `atomic_write_bytes`); for files too large to build in memory first. A
    symbolic link is replaced, its target left alone; a device, pipe or socket at `path` is a ValueError
    (`pruning.atomic_file.write_atomically`, the project's one writer)."""
    return write_atomically(path, write)


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Atomically write a trainer checkpoint dict as `directory/epoch_NNNN.pt` (N = `state["epoch"]`)."""
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks keys {missing}; expected at least {list(REQUIRED_KEYS)}")
    return atomic_torch_save(state, Path(directory) / checkpoint_name(int(state["epoch"])))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a trainer checkpoint written by `save_checkpoint`.

    A directory means "the newest checkpoint in it". Raises FileNotFoundError when nothing is
    there, ValueError when the file is not a readable trainer checkpoint.
    """
    path = checkpoint_file(path)
    return checked_trainer_checkpoint(read_checkpoint_file(path, map_location), path)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """`path`, or the newest `epoch_NNNN.pt` when it is a directory (FileNotFoundError: none there)."""
    path = Path(path)
    if path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: no checkpoint (epoch_NNNN.pt) in this directory")
        path = latest
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    return path


def read_checkpoint_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """What `torch.save` wrote to `path`; ValueError naming the file (and, for a damaged
    `epoch_NNNN.pt`, the older one to resume from) when it cannot be read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several unrelated types for a corrupt file
        damaged = CHECKPOINT_PATTERN.match(path.name)
        older = [] if damaged is None else sorted(
            (int(match.group(1)), entry.name) for entry in path.parent.iterdir()
            if (match := CHECKPOINT_PATTERN.match(entry.name)) and int(match.group(1)) < int(damaged.group(1)))
        hint = f"; delete it to resume from {older[-1][1]}" if older else ""
        raise ValueError(f"{path}: not a readable checkpoint, damaged or cut short? ({unreadable_detail(err)})"
                         f"{hint}") from err


WEIGHTS_ONLY_CAUSE = "WeightsUnpickler error: "      # where torch's weights-only refusal names its cause


def unreadable_detail(error: BaseException) -> str:
    """"Type: first sentence" of a `torch.load` error, at most 200 characters (torch's own messages
    run to several sentences of advice, which a one-line error cut mid-sentence). For a weights-only
    load, the sentence that names what it refused ("Unsupported global: ..."), after its advice."""
    text = " ".join(str(error).split())
    text = text.split(WEIGHTS_ONLY_CAUSE, 1)[-1]
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] or "empty or cut short"
    return f"{type(error).__name__}: {first if len(first) <= 200 else first[:197] + '...'}"


def checked_trainer_checkpoint(state: Any, path: Path) -> dict[str, Any]:
    """`state` when it holds a trainer checkpoint's keys; ValueError naming `path` otherwise."""
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected a trainer checkpoint with keys {list(REQUIRED_KEYS)}, found {found}")
    return state


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)\.?")


def load_error_summary(error: RuntimeError, shown: int = 2) -> str:
    """One line from a `load_state_dict` error: its first `shown` details (a size mismatch as
    "size mismatch for NAME: [checkpoint shape] in the checkpoint, [model shape] in the model";
    missing or unexpected keys cut to 200 characters) and how many more there are."""
    details = [_SIZE_MISMATCH.sub(r"size mismatch for \1: [\2] in the checkpoint, [\3] in the model", line.strip())
               for line in str(error).splitlines()[1:] if line.strip()]
    if not details:
        return str(error).strip()
    more = f" (and {len(details) - shown} more)" if len(details) > shown else ""
    return "; ".join(detail if len(detail) <= 200 else detail[:197] + "..." for detail in details[:shown]) + more


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The `epoch_NNNN.pt` in `directory` with the highest epoch, or None. Temp files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    numbered = []
    for entry in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_file():
            numbered.append((int(match.group(1)), entry))
    return max(numbered)[1] if numbered else None


def checkpoint_epoch(path: str | os.PathLike) -> int:
    """The epoch in an `epoch_NNNN.pt` name (-1 for another name)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else -1


def remove_older_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest `epoch_NNNN.pt` in `directory`, and the temporary files that
    writes killed half-way left there; returns the deleted paths. (Call it after a save, with no
    other write in flight in `directory`.)"""
    numbered = sorted((int(match.group(1)), entry) for entry in Path(directory).iterdir()
                      if (match := CHECKPOINT_PATTERN.match(entry.name)) and entry.is_file())
    doomed = [entry for _, entry in numbered[:-keep]] if keep > 0 else []
    for entry in doomed:
        entry.unlink(missing_ok=True)
    return doomed + remove_stale_temp_files(directory)


def remove_stale_temp_files(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete what kills left in `directory` (and below it, if `recursive`): the temporary files of
    atomic writes (`.yolo-admm-write.NAME.XXXXXXXX.tmp`) and the staging folders of exports
    (`engine.staging_folder`) that no live process holds; returns those removed."""
    stale = [entry for parent, _, file_names in walk_to_sweep(directory, recursive)
             for entry in (parent / name for name in file_names if TEMP_FILE_PATTERN.match(name))
             if not entry.is_symlink() and remove_unheld(entry, partial(entry.unlink, missing_ok=True))]
    return stale + remove_abandoned_staging_folders(directory, recursive)
