"""Staging folders: hidden folders that a job writes files into before moving them into place
together (`detector.export.export_model`'s), and the sweep that removes the ones a killed job left.

A staging folder is held with an exclusive `flock` on the folder itself for as long as its job
uses it. The operating system lets the lock go when the job's process ends, however it ends, so a
sweep takes a staging folder only when it can take its lock: a killed job's folder is removed, a
live one's is left alone, whoever sweeps (a prune run, or the next export into the same folder).
Where `fcntl` or `flock` is unavailable (Windows; some network file systems) nothing is held and
nothing is swept: a killed job's staging folder stays.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:                     # Windows
    fcntl = None

STAGING_FOLDER_PREFIX = ".yolo-admm-export."        # the only folders a sweep removes
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextmanager
def staging_folder(parent: str | os.PathLike, stem: str) -> Iterator[Path]:
    """A new hidden folder `parent/.yolo-admm-export.STEM.XXXXXXXX.tmp`, held while the block runs
    and removed after it, with whatever is still in it."""
    while True:
        folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_FOLDER_PREFIX}{stem}.", suffix=".tmp", dir=parent))
        descriptor = _locked_descriptor(folder, wait=True)
        if descriptor is None and folder.is_dir() or descriptor is not None and os.fstat(descriptor).st_nlink:
            break
        if descriptor is not None:      # a sweep took it between mkdtemp and the lock: make another
            os.close(descriptor)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if descriptor is not None:
            os.close(descriptor)


def remove_abandoned_staging_folders(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the staging folders in `directory` (and below it, if `recursive`) that no live job
    holds; returns them."""
    pattern = f"{STAGING_FOLDER_PREFIX}*.tmp"
    candidates = Path(directory).rglob(pattern) if recursive else Path(directory).glob(pattern)
    removed = []
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir():
            continue
        descriptor = _locked_descriptor(folder, wait=False)
        if descriptor is None:
            continue                    # held by a live job, gone, or this file system cannot lock
        try:
            shutil.rmtree(folder, ignore_errors=True)   # under the lock: the job making it waits
        finally:
            os.close(descriptor)
        removed.append(folder)
    return removed


def _locked_descriptor(folder: Path, wait: bool) -> int | None:
    """An open descriptor of `folder` holding its exclusive lock, or None: another holds it (and
    `wait` is False), the folder is gone, or locking is unavailable here."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(descriptor)
        if isinstance(err, BlockingIOError) or err.errno in _UNSUPPORTED:
            return None
        raise
    return descriptor
