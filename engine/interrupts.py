"""Ctrl-C and SIGTERM held over code that an interrupt raised midway would leave broken.

Python raises KeyboardInterrupt at whatever line the main thread runs when the signal lands. In a
DataLoader that forks or joins its workers, that line can be inside multiprocessing or an at-fork
hook: `scripts/interrupt_fuzz.py --early` found a Ctrl-C there lost (the job trained on, or hung
joining a worker that had exited) or the process killed by SIGINT after the task had stopped. Held,
the signal is acted on right after such a block, by the handler that was installed before it.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM over the block, then act on the first that came with the handler
    installed before it (which raises KeyboardInterrupt, for Python's default SIGINT handler).

    A second signal during the block is acted on at once, so that a block that hangs can still be
    stopped. Only signals that Python handles are held (an ignored SIGINT stays ignored), and only
    in the main thread, the one that signal handlers run in; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous: dict[int, Callable] = {}

    def hold(signum: int, frame) -> None:
        held.append(signum)
        if len(held) > 1:                    # asked again: at once
            previous[signum](signum, frame)

    for number in HELD_SIGNALS:
        if callable(signal.getsignal(number)):
            previous[number] = signal.signal(number, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if held:
        previous[held[0]](held[0], None)


def held_iteration(iterable: Iterable[Item]) -> Iterator[Item]:
    """The items of `iterable`, with interrupts held (`held_interrupts`) while its iterator is made,
    while each item is fetched and while the iterator is let go: a DataLoader starts its worker
    processes, and stops them, in these calls."""
    with held_interrupts():
        iterator = iter(iterable)
    try:
        while True:
            with held_interrupts():
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
    finally:
        with held_interrupts():
            del iterator
