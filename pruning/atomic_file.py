"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``, so readers
see the old file or the new one, never a partial one.

The one writer of the project: ``pruning`` imports only torch and the standard library, so it
lives here, and ``engine``'s ``atomic_write`` family builds on it.
"""
from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``write_atomically``)."""
    return write_atomically(path, lambda stream: stream.write(data))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(stream)`` on a binary temporary file beside ``path``, fsync it, then
    ``os.replace`` it into place; the temporary file is removed if anything fails, and the result
    gets the usual (umask) permissions. A symbolic link at ``path`` is written through: its target
    is replaced, the link kept.

    Returns:
        ``path``.
    Raises:
        ValueError: ``path`` is a device, a pipe or a socket (replacing it would put a file in
            its place), or a folder.
    """
    path = Path(path)
    target = writable_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temp_name, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def writable_target(path: Path) -> Path:
    """The file that writing ``path`` replaces: ``path``, or a symbolic link's target.

    Raises:
        ValueError: it exists and is not a regular file (names it and what it is).
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = target.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):   # nothing there yet (or a file in the folder's place)
        return target
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise ValueError(f"{path}: expected a file to write, found {kind}")
    return target
