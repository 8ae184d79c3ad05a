"""argparse types and parsing shared by the `detect` and `classify` command lines."""
from __future__ import annotations

import argparse
import contextlib
import io
import os


def is_rank0() -> bool:
    """True unless torchrun's RANK (with its WORLD_SIZE: a RANK alone is no torchrun run) names
    another process than rank 0 (read as an integer)."""
    if "WORLD_SIZE" not in os.environ:
        return True
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, whose usage errors and --help (SystemExit) only rank 0 prints under
    torchrun: every rank parses the same words and fails, or helps, alike."""
    if is_rank0():
        return parser.parse_args(argv)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return parser.parse_args(argv)


def pattern_list(text: str) -> list[str]:
    """Type of --include / --exclude: comma-separated parameter-name patterns, at least one (an
    empty list would read as "no restriction")."""
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError(f"expected comma-separated patterns, found none in {text!r}")
    return patterns
