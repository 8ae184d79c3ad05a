"""Staging folders: hidden folders that a job writes files into before moving them into place
together (`detector.export.export_model`'s), and the sweep that removes the ones a killed job left.

A staging folder `.yolo-admm-export.STEM.XXXXXXXX.tmp` is held, for as long as its job uses it,
through an exclusive `flock` on a file in it (`HOLD_FILE`), as `pruning.atomic_file` holds its
temporary files: the operating system lets the lock go when the job's process ends, however it
ends, so a sweep removes a killed job's folder and leaves a live one's, whoever sweeps (the next
export into the same folder, a prune run, a trainer). Where `flock` is unavailable nothing is held
and nothing is swept: a killed job's staging folder stays.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from pruning.atomic_file import NO_FOLLOW, hold, remove_unheld

STAGING_FOLDER_PREFIX = ".yolo-admm-export."
STAGING_FOLDER_PATTERN = re.compile(rf"^{re.escape(STAGING_FOLDER_PREFIX)}.+\.\w{{8}}\.tmp$")  # what a sweep removes
HOLD_FILE = ".held"


@contextmanager
def staging_folder(parent: str | os.PathLike, stem: str) -> Iterator[Path]:
    """A new staging folder in `parent` (`.yolo-admm-export.STEM.XXXXXXXX.tmp`), held while the
    block runs and removed after it, with whatever is still in it. Its `HOLD_FILE` is not the job's
    (`staged_files` lists what is)."""
    folder, descriptor = _held_staging_folder(Path(parent), stem)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(descriptor)


def staged_files(folder: Path) -> list[Path]:
    """What a job put in its staging `folder`, sorted."""
    return sorted(entry for entry in folder.iterdir() if entry.name != HOLD_FILE)


def remove_abandoned_staging_folders(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the staging folders in `directory` (and below it, if `recursive`) that no live job
    holds; returns those removed."""
    removed = []
    for parent, folder_names, _ in walk_to_sweep(directory, recursive):
        for folder in (parent / name for name in folder_names if STAGING_FOLDER_PATTERN.match(name)):
            remove = partial(shutil.rmtree, folder, ignore_errors=True)      # what it cannot remove stays
            if (not folder.is_symlink() and remove_unheld(folder / HOLD_FILE, remove, create=True)
                    and not folder.exists()):
                removed.append(folder)
    return removed


def walk_to_sweep(directory: str | os.PathLike, recursive: bool) -> Iterator[tuple[Path, list[str], list[str]]]:
    """(folder, the names of its folders, the names of its files) for `directory` and, if
    `recursive`, each folder below it, as `os.walk`: links are not followed, and a folder that
    vanishes meanwhile (another job's, removed) is passed over. Staging folders are not entered:
    what is in one is its job's."""
    for folder, folder_names, file_names in os.walk(directory):
        yield Path(folder), folder_names, file_names
        folder_names[:] = [name for name in folder_names if recursive and not STAGING_FOLDER_PATTERN.match(name)]


def _held_staging_folder(parent: Path, stem: str) -> tuple[Path, int]:
    """(a new staging folder, the open descriptor of its held `HOLD_FILE`); made again when a sweep
    removed it before it was held."""
    while True:
        folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_FOLDER_PREFIX}{stem}.", suffix=".tmp", dir=parent))
        try:
            descriptor = os.open(folder / HOLD_FILE, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o600)
        except FileNotFoundError:               # a sweep removed the folder already
            continue
        try:
            held = hold(descriptor, wait=True)
        except BaseException:
            os.close(descriptor)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if held is not True or os.fstat(descriptor).st_nlink > 0:
            return folder, descriptor
        os.close(descriptor)                    # a sweep removed it while this waited for its hold
