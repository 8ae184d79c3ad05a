"""Output paths checked before any long work: a folder created and probed, a file whose folder
takes it, no output that is one of the command's inputs; each error names the command-line option
that gave the path."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from pruning.atomic_file import check_writable


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


def refuse_overwriting_inputs(outputs: Iterable[Path], inputs: Mapping[str, str | os.PathLike | None],
                              where: str) -> None:
    """Refuse, before any work, a command whose `outputs` (the files it writes) include one of its
    `inputs` (option -> path; None where not given): writing it would replace the user's file.

    Raises:
        ValueError: names `where` (the option that placed the outputs, with its value), the file
            and the option that gave it as input.
    """
    given = {Path(path).resolve(): flag for flag, path in inputs.items() if path is not None}
    for output in outputs:
        flag = given.get(Path(output).resolve())
        if flag is not None:
            raise ValueError(f"{where}: this run would overwrite its own input {output} ({flag}); "
                             f"write its outputs elsewhere")
