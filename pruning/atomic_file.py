"""Atomic file writes for the pruning core's outputs (archives, reports, Ultralytics state).

``pruning`` imports only torch and the standard library, so it keeps this writer rather than
using ``engine``'s ``atomic_write_bytes``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then ``os.replace`` it into place:
    readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temp_name, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    return path
