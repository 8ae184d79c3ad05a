"""Ctrl-C and SIGTERM held over code that an interrupt raised midway would leave broken.

Python raises KeyboardInterrupt at whatever line the main thread runs when the signal lands. In a
DataLoader that forks or joins its workers, that line can be an at-fork hook, whose exception os.fork
only reports (the job trained on), or multiprocessing's bookkeeping between a fork and its record
(after an early Ctrl-C in `scripts/interrupt_fuzz.py --early`, a job once hung joining a worker).
Held, the signal is acted on right after such a block, by the handler installed before it.
"""
from __future__ import annotations

import contextlib
import itertools
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM over the block, then act on the first that came with the handler
    installed before it (which raises KeyboardInterrupt, for Python's default SIGINT handler), also
    when the block failed (a worker process that the same Ctrl-C stopped).

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

    try:
        for number in HELD_SIGNALS:
            if callable(signal.getsignal(number)):
                previous[number] = signal.signal(number, hold)
        yield
    finally:
        _restore(previous)
        if len(held) == 1:                   # in place of what the block raised, if it failed
            previous[held[0]](held[0], None)


def _restore(previous: dict[int, Callable]) -> None:
    """Put every handler back, even when a signal that lands meanwhile raises; then raise that."""
    error: BaseException | None = None
    for number, handler in previous.items():
        while True:
            try:
                signal.signal(number, handler)
                break
            except BaseException as raised:  # a pending signal's handler ran (and raised) before the swap
                error = error or raised
    if error is not None:
        raise error


def held_iteration(iterable: Iterable[Item]) -> Iterator[Item]:
    """The items of `iterable`, with interrupts held (`held_interrupts`) while its iterator is made,
    in the call that finds it exhausted and while the iterator is let go: a DataLoader starts its
    worker processes in the first and stops them in the others. While it waits for a batch, an
    interrupt acts at once, as before (without a length, every call is held)."""
    with held_interrupts():
        iterator = iter(iterable)
    try:
        length: int | None = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        length = None
    try:
        for fetched in itertools.count():
            with held_interrupts() if length is None or fetched >= length else contextlib.nullcontext():
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
    finally:
        with held_interrupts():
            del iterator
