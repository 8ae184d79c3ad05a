"""Comparing a run's recorded settings with a resumed run's: what changed, said for an error
message, with paths compared absolute."""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any


def changed_settings(before: Mapping[str, Any], now: Mapping[str, Any],
                     ignore: Collection[str] = ()) -> list[tuple[str, Any, Any]]:
    """(name, before, now) for each setting of `now` whose value in `before` differs, sorted by name,
    those in `ignore` aside: what a resumed run would change. Nested mappings compare key by key
    (name "outer.inner"); a setting `before` lacks counts as None there."""
    changes = []
    for key in sorted(now):
        if key in ignore:
            continue
        old, new = before.get(key), now.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += [(f"{key}.{name}", a, b) for name, a, b in changed_settings(old, new)]
        elif old != new:
            changes.append((key, old, new))
    return changes


# Settings a run records that no flag of its command sets: how the command line changes them.
NOT_FLAGS = {"processes": "torchrun --nproc_per_node"}


def describe_changes(changes: Iterable[tuple[str, Any, Any]], as_flags: bool = False) -> str:
    """`changed_settings`' result for an error message: "name: before -> now" (as_flags: "--name
    before -> now", or for a setting in `NOT_FLAGS` what sets it), joined by "; ", with None shown
    as "not given" (an option left to its default or, for a setting an older run did not record,
    one it did not have)."""
    def shown(value: Any) -> str:
        return "not given" if value is None else repr(value)

    def name(key: str) -> str:
        if not as_flags:
            return f"{key}: "
        return f"{NOT_FLAGS[key]} " if key in NOT_FLAGS else f"--{key.replace('_', '-')} "

    return "; ".join(f"{name(key)}{shown(old)} -> {shown(new)}" for key, old, new in changes)


def resolved_paths(settings: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """`settings` with the values of `keys` that are set made absolute paths, so that a resumed run
    given a file by another spelling (relative, absolute) compares equal to the run it continues."""
    return {key: str(Path(value).resolve()) if key in keys and value not in (None, "") else value
            for key, value in settings.items()}
