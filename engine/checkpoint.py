"""Checkpoint files: atomic save, validated load, and finding the newest one in a directory.

A checkpoint is a plain dict written with `torch.save`. Saving goes through a temporary file in
the same directory and `os.replace`, so a crash mid-write never leaves a truncated checkpoint
under the final name: readers see either the old file or the new one.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from pruning.atomic_file import check_writable, write_atomically

CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d+)\.pt$")
TEMP_FILE_PATTERN = re.compile(r"^\..+\.\w{8}\.tmp$")   # what atomic_write's mkstemp names: .NAME.XXXXXXXX.tmp
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


def output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Create the output folder `path` of option `flag` now, before any long work, and return it
    (a probe file created and removed in it shows that it takes files).

    Raises:
        ValueError: it cannot be created or written (names the flag, the path and why).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"expected a folder at {blocker}, found a file" if blocker is not None else err.strerror or str(err)
        raise ValueError(f"{flag} {path}: cannot create this output folder: {why}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: expected a writable folder, found one without write permission")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".yolo-admm-probe."):
            pass                                    # what access() cannot tell: /proc, a read-only mount
    except OSError as err:
        raise ValueError(f"{flag} {path}: expected a folder that takes new files, found one that does not "
                         f"(creating one failed: {err.strerror or err})") from None
    return path


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """Check, before any long work, that the output file `path` of option `flag` can be written:
    it is a file or nothing yet (or a symbolic link to one, which the write replaces), and its folder
    exists or is created now and takes new files. Returns `path`.

    Raises:
        ValueError: it is a folder, a device, a pipe or a socket, or its folder cannot take it.
    """
    path = Path(path)
    try:
        check_writable(path)
    except ValueError as err:
        raise ValueError(f"{flag} {err}") from None
    output_folder(path.parent, f"{flag} {path}: its folder")
    return path


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


def changed_settings(before: Mapping[str, Any], now: Mapping[str, Any],
                     ignore: Collection[str] = ()) -> list[tuple[str, Any, Any]]:
    """(name, before, now) for each setting of `now` whose value in `before` differs, sorted by name,
    those in `ignore` aside: what a resumed run would change. Nested mappings compare key by key
    (name "outer.inner"); a setting `before` lacks counts as None there."""
    changes = []
    for key in sorted(now):
        if key in ignore:
            continue
        old, new = before.get(key), now.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += [(f"{key}.{name}", a, b) for name, a, b in changed_settings(old, new)]
        elif old != new:
            changes.append((key, old, new))
    return changes


def describe_changes(changes: Iterable[tuple[str, Any, Any]], as_flags: bool = False) -> str:
    """`changed_settings`' result for an error message: "name: before -> now" (as_flags: "--name
    before -> now"), joined by "; ", with None shown as "not given" (an option left to its default
    or, for a setting an older run did not record, one it did not have)."""
    def shown(value: Any) -> str:
        return "not given" if value is None else repr(value)

    def name(key: str) -> str:
        return f"--{key.replace('_', '-')} " if as_flags else f"{key}: "

    return "; ".join(f"{name(key)}{shown(old)} -> {shown(new)}" for key, old, new in changes)


def resolved_paths(settings: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """`settings` with the values of `keys` that are set made absolute paths, so that a resumed run
    given a file by another spelling (relative, absolute) compares equal to the run it continues."""
    return {key: str(Path(value).resolve()) if key in keys and value not in (None, "") else value
            for key, value in settings.items()}


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
    """Delete the temporary files of atomic writes that a kill interrupted (`.NAME.XXXXXXXX.tmp`) in
    `directory` (and below it, if `recursive`); returns them. Only while nothing writes there."""
    entries = Path(directory).rglob(".*.tmp") if recursive else Path(directory).glob(".*.tmp")
    stale = [entry for entry in entries if TEMP_FILE_PATTERN.match(entry.name) and entry.is_file()]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale
