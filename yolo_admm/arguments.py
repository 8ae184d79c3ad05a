"""argparse types shared by the `detect` and `classify` command lines."""
from __future__ import annotations

import argparse


def pattern_list(text: str) -> list[str]:
    """Type of --include / --exclude: comma-separated parameter-name patterns, at least one (an
    empty list would read as "no restriction")."""
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError(f"expected comma-separated patterns, found none in {text!r}")
    return patterns
