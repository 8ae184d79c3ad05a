"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``, so readers
see the old file or the new one, never a partial one.

The temporary file (``.yolo-admm-write.NAME.XXXXXXXX.tmp``) is held with an exclusive ``flock``
until it is in place. The operating system lets the lock go when the writer's process ends, however
it ends, so a sweep (``remove_unheld``) removes what a killed write left and never a live write's
file. Where ``fcntl`` or ``flock`` is unavailable (Windows; some file systems) nothing is held and
nothing is swept.

The one writer of the project: ``pruning`` imports only torch and the standard library, so it
lives here, and ``engine``'s ``atomic_write`` family builds on it.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:                     # Windows
    fcntl = None

TEMP_FILE_PREFIX = ".yolo-admm-write."   # temporary files are .yolo-admm-write.NAME.XXXXXXXX.tmp
UNLOCKABLE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}   # flock's "not on this file system"
CAN_HOLD = fcntl is not None
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)           # Windows has none (and no links to fear there)


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
    handle, temp_name, held = _held_temp_file(path)
    try:
        with os.fdopen(handle, "wb") as stream:     # closing it lets the hold go: after the replace
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(temp_name, 0o666 & ~mask)     # mkstemp makes 0600
            if held:
                os.replace(temp_name, path)
        if not held:                                # Windows renames no open file
            os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        interrupt = _interrupt_behind(error, handled_before)
        if interrupt is not None and interrupt is not error:
            raise interrupt from None   # Ctrl-C stays Ctrl-C (see _interrupt_behind)
        raise
    return path


def _held_temp_file(path: Path) -> tuple[int, str, bool]:
    """(descriptor, name, whether it is held) of a new temporary file beside ``path``; made again
    when a sweep removed it before it was held."""
    while True:
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_FILE_PREFIX}{path.name}.", suffix=".tmp")
        try:
            held = hold(descriptor, wait=True)
        except BaseException:
            os.close(descriptor)
            Path(name).unlink(missing_ok=True)
            raise
        if held is not True or os.fstat(descriptor).st_nlink > 0:
            return descriptor, name, held is True
        os.close(descriptor)                    # a sweep removed it while this waited for its hold


def hold(descriptor: int, wait: bool) -> bool | None:
    """Take an exclusive ``flock`` on ``descriptor`` (a file opened for reading and writing): True
    once held, False when another process holds it and ``wait`` is False, None where this platform
    or file system cannot lock. Closing the descriptor lets it go."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in UNLOCKABLE:
            return None
        raise
    return True


def remove_unheld(hold_file: Path, remove: Callable[[], Any], create: bool = False) -> bool:
    """Call ``remove()`` while holding ``hold_file`` (a temporary file, or the file that holds a
    folder; ``create`` it if missing), unless a live process holds it: whether it did. Whoever made
    it and waits for its hold finds it unlinked, and makes another. What cannot be removed (in a
    folder not ours to write) stays: False."""
    if not CAN_HOLD:
        return False
    flags = os.O_RDWR | NO_FOLLOW | (os.O_CREAT if create else 0)
    try:
        descriptor = os.open(hold_file, flags, 0o600)
    except OSError:                                  # gone, a link, or not ours to open
        return False
    try:
        if hold(descriptor, wait=False) is not True:
            return False
        remove()
        return True
    except PermissionError:
        return False
    finally:
        os.close(descriptor)


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
