"""One job per run folder.

Two jobs writing one run folder would overwrite each other's checkpoints and records.
`run_folder_lock` takes an exclusive `flock` on `FOLDER/.yolo-admm.lock` for as long as the job
runs; a second job on the same folder stops at once with an error naming the holder. The
operating system lets the lock go when the holder's process ends, however it ends (SIGKILL
included), so a killed run never leaves a stale lock: the next job resumes it. Data-loader
worker processes forked by the holder share its lock until they exit too, a second or so later: a
job that finds the lock held by a process of this host that has ended waits up to `ORPHAN_WAIT_S`
for them. The file itself stays, holding the last holder's description.

Rank 0 alone takes the lock under torchrun (it alone writes the folder), and every rank raises
when it cannot. Where `fcntl` or `flock` is unavailable (Windows; some network file systems) the
job runs unlocked, with a warning.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from engine import distributed
from pruning.atomic_file import CAN_HOLD, hold

LOCK_FILE = ".yolo-admm.lock"
ORPHAN_WAIT_S = 10.0          # how long the forked workers of an ended holder may keep its lock


@contextmanager
def run_folder_lock(folder: str | os.PathLike | None, flag: str) -> Iterator[None]:
    """Hold `folder` (an existing folder; None: nothing to hold) for this job while the block runs.

    Args:
        folder: the run folder the job writes.
        flag: the option that named it, for the error message (e.g. "--out").
    Raises:
        ValueError: another process holds the folder (names the folder, the flag and the holder).
    """
    handle, problem = None, None
    if folder is not None and distributed.is_main():
        try:
            handle, problem = _hold(Path(folder), flag)
        except ValueError as err:                       # said by every rank, not only this one
            problem = str(err)
    distributed.raise_on_every_rank(problem)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()                  # closing the file lets the lock go


def _hold(folder: Path, flag: str) -> tuple[IO[str] | None, str | None]:
    """(the locked file, None), waiting for the forked workers of a holder that has ended, or
    (None, what is wrong) when another process holds `folder`."""
    handle, holder = _take(folder / LOCK_FILE)
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while holder is not None and _holder_ended(holder) and time.monotonic() < deadline:
        time.sleep(0.1)                                 # its forked workers still hold the lock
        handle, holder = _take(folder / LOCK_FILE)
    if holder is None:
        return handle, None
    if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()} "):
        return None, f"{flag} {folder}: this process already holds this run folder"
    return None, (f"{flag} {folder}: expected a run folder no other job is using, found it in use by {holder}; "
                  f"wait for that job to end, or choose another {flag}")


def _take(path: Path) -> tuple[IO[str] | None, str | None]:
    """(the open, locked file, None), or (None, a description of the holder) when another holds it;
    (None, None) when this file system cannot lock (a warning says so)."""
    if not CAN_HOLD:
        _warn_unlocked(path, "this platform has no fcntl")
        return None, None
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:                  # a symbolic link: its target is not ours to truncate
            raise ValueError(f"{path}: expected the run folder's lock file, found a symbolic link") from None
        raise
    handle = os.fdopen(descriptor, "r+", encoding="utf-8")
    try:
        held = hold(handle.fileno(), wait=False)
    except OSError:
        handle.close()
        raise
    if held is False:
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, holder
    if held is None:
        handle.close()
        _warn_unlocked(path, "this file system cannot lock files")
        return None, None
    handle.truncate(0)
    handle.seek(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)[:2000]})\n")
    handle.flush()
    return handle, None


def _holder_ended(holder: str) -> bool:
    """Whether the holder description names a process of this host that no longer runs."""
    match = re.match(r"pid (\d+) on (\S+) ", holder)
    if match is None or match.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:                           # runs, as another user
        return False
    return False


def _warn_unlocked(path: Path, why: str) -> None:
    warnings.warn(f"cannot lock {path} ({why}): nothing stops a second job from writing this run folder",
                  stacklevel=3)
