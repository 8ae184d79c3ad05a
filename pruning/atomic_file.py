"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``, so readers
see the old file or the new one, never a partial one.

The one writer of the project: ``pruning`` imports only torch and the standard library, so it
lives here, and ``engine``'s ``atomic_write`` family builds on it.
"""
from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP_FILE_PREFIX = ".yolo-admm-write."   # temporary files are .yolo-admm-write.NAME.XXXXXXXX.tmp


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``write_atomically``)."""
    return write_atomically(path, lambda stream: stream.write(data))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(stream)`` on a binary temporary file beside ``path``, fsync it, then
    ``os.replace`` it into place; the temporary file is removed if anything fails, and the result
    gets the usual (umask) permissions. A symbolic link at ``path`` is replaced by the file (its
    target is left as it was: a link into the user's files must not make them an output).

    Returns:
        ``path``.
    Raises:
        ValueError: ``path`` is a device, a pipe or a socket (replacing it would put a file in
            its place), or a folder.
    """
    path = Path(path)
    check_writable(path)
    handled_before = sys.exc_info()[1]       # an interrupt handled by our caller is not this write's
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_FILE_PREFIX}{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temp_name, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        interrupt = _interrupt_behind(error, handled_before)
        if interrupt is not None and interrupt is not error:
            raise interrupt from None   # Ctrl-C stays Ctrl-C (see _interrupt_behind)
        raise
    return path


def _interrupt_behind(error: BaseException, handled_before: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that ``error`` was raised while handling, or ``error`` itself when it is
    one, up to ``handled_before`` (what was being handled when the write began); None otherwise.
    ``torch.save`` answers a Ctrl-C in the middle of a file with its own RuntimeError ("unexpected
    pos") as it closes the archive, and the interrupt must not turn into a failure."""
    seen: set[int] = set()
    while error is not None and error is not handled_before and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__context__
    return None


def check_writable(path: Path) -> None:
    """That writing ``path`` may replace what is there: nothing, a regular file, or a symbolic link
    to one (or to nothing).

    Raises:
        ValueError: it is, or links to, a folder, a device, a pipe or a socket (names it and what it
            is: ``/dev/null``, or ``/dev/stdout``, a link to a pipe or terminal, would be replaced).
    """
    try:
        mode = path.stat().st_mode                   # through a link: what it points at
    except (FileNotFoundError, NotADirectoryError):   # nothing there yet (or a file in the folder's place)
        return
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise ValueError(f"{path}: expected a file to write, found {kind}")
