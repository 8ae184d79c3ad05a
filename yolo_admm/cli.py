"""`yolo-admm TASK MODE [options]`: the one command-line entry point.

Each task owns its modes in its own package (`detector.cli`, `classify.cli`); this module only
dispatches, so `yolo-admm detect --help` and `yolo-admm classify prune --help` are the tasks' own.

Failures end with one line `yolo-admm TASK: error: MESSAGE` on stderr and no traceback (set
YOLO_ADMM_DEBUG=1 to see it): bad input (ValueError, OSError such as a missing file or an
unwritable folder) and a loss that stopped being finite exit with 2, as does running out of memory
(the message suggests a smaller --batch-size); Ctrl-C, or SIGTERM (which torchrun sends its
processes right after passing on a Ctrl-C), exits with 130 (`detect train` and `detect prune` also
say how to resume). Under torchrun only rank 0 says so, and a process whose peer stopped says that
in one line instead of the process group's traceback.
Warnings print as `yolo-admm TASK: warning: MESSAGE`.
"""
from __future__ import annotations

import _thread
import importlib
import multiprocessing.util
import os
import queue
import signal
import sys
import threading
import time
import warnings
from types import ModuleType
from typing import Callable

from yolo_admm.arguments import is_rank0

TASKS = {
    "detect": ("detector.cli", "Darknet YOLO detectors: predict, eval, train, prune, export"),
    "classify": ("classify.cli", "classifiers (LeNet-5, ResNet-56): train, eval, prune"),
}

USAGE = "usage: yolo-admm TASK MODE [options]\n\ntasks:\n" + "".join(
    f"  {name:<10}{summary}\n" for name, (_, summary) in TASKS.items()
) + "\nRun `yolo-admm TASK --help` for the modes of a task, `yolo-admm --version` for the version."

# torch.utils.data re-raises a worker's exception with the worker's traceback inside the message.
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"

# An interrupt that has not ended the task this long after it was raised is raised again: C code
# that clears errors (PyObject_HasAttr, PyDict_GetItem around a Python __getattr__ or __hash__)
# drops a KeyboardInterrupt raised in the Python code it calls, without a report.
RAISE_LOST_INTERRUPT_AFTER_S = 4.0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:                                       # as `yolo-admm detect` without a mode: a usage error
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(f"yolo-admm {_version()}")
        return 0
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"yolo-admm: unknown task {task!r}; expected one of {', '.join(TASKS)}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    # Before torch is first imported: OpenMP threads that spin-wait for each other make torch
    # several times slower on a busy machine (measured in benchmarks/eval_speed.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "TORCHELASTIC_RUN_ID" in os.environ:           # a rank started by torchrun's agent
        stop_when_orphaned(os.environ.get("RANK", "?"))
    guard = _InterruptGuard()
    try:
        with warnings.catch_warnings():
            guard.start()
            module = _import_holding_interrupts(TASKS[task][0])   # torch and the rest: a second or two
            warnings.showwarning = _warning_printer(task)
            return _run_task(task, module, rest)
    except KeyboardInterrupt:                  # while importing, or outside the task's own handling
        if is_rank0():
            print(f"yolo-admm {task}: interrupted", file=sys.stderr)
        return 130
    finally:
        while True:                            # an interrupt raised again just as stop() starts: stop again
            try:
                guard.stop()
                break
            except KeyboardInterrupt:
                pass
        _forget_interrupts_of_string_code()


def _forget_interrupts_of_string_code() -> None:
    """Clear CPython's flag that code run from a string (exec or eval of a string, as dataclasses and
    namedtuple use to build their methods) ended with a KeyboardInterrupt. The flag stays set even
    when the interrupt is caught later, and under `python -m` the interpreter then kills itself
    with SIGINT at exit: a Ctrl-C that main() had handled (exit 130) ended so 8 times in 320 early
    ones (scripts/interrupt_fuzz.py --early). Every string exec clears it as it starts."""
    exec("pass")


def _import_holding_interrupts(name: str) -> ModuleType:
    """Import module `name` with Ctrl-C and SIGTERM held until the import is done, then raise
    KeyboardInterrupt if one came. Raised inside the import, an interrupt left half-imported
    modules behind (numpy then recursed until RecursionError) or killed the process with SIGINT
    after its "interrupted" line: 5 of 30 early interrupts ended so in a test before this hold (the
    latter through the string-exec flag, see `_forget_interrupts_of_string_code`). Only signals that
    Python handles are held (an ignored SIGINT stays ignored), and only in the main thread, the one
    signal handlers run in.

    `engine.interrupts.held_interrupts` holds signals the same way for the training code; it cannot
    serve here, because importing `engine` imports torch, which is what this hold must cover."""
    if threading.current_thread() is not threading.main_thread():
        return importlib.import_module(name)
    held: list[int] = []
    previous: dict[int, Callable] = {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            if callable(signal.getsignal(number)):
                previous[number] = signal.signal(number, lambda signum, _frame: held.append(signum))
        module = importlib.import_module(name)
    finally:
        _put_back_handlers(previous)
    if held:
        raise KeyboardInterrupt
    return module


def _put_back_handlers(previous: dict[int, Callable]) -> None:
    """Put every handler back, even when a signal that lands meanwhile raises; then raise that
    (as `engine.interrupts` does: a handler left behind would swallow every later SIGTERM)."""
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


class _InterruptGuard:
    """While the task runs, SIGTERM raises KeyboardInterrupt, so it stops as Ctrl-C does; and a
    KeyboardInterrupt that Python could only report ("Exception ignored in ...") is raised again.

    A signal is acted on in the next Python code the main thread runs. While a DataLoader forks its
    workers, that can be an at-fork hook (logging's `_releaseLock`, which os.fork runs in the parent
    after the fork), and os.fork reports a hook's exception and carries on: the job trained on
    (about one Ctrl-C in 3 sent as a worker is forked, scripts/interrupt_fuzz.py). `__del__`
    methods and weakref callbacks swallow exceptions likewise.

    While it guards, `sys.unraisablehook` is a SimpleQueue's put(): C code, which no signal
    interrupts, so nothing is lost there. A thread reports the other exceptions through the previous
    hook; a swallowed interrupt it raises again in the main thread 10 ms later (through SIGTERM,
    whose handler is ours: SIGINT may be ignored, as in a job a script started with `&`), unless
    another interrupt was raised since (torchrun's SIGTERM after the terminal's SIGINT, a second
    Ctrl-C) or the task has ended. Interrupts are counted by our handler, which SIGINT gets too
    unless another one than Python's default is installed.

    C code that clears errors drops an interrupt without a report. So the same thread raises the
    newest interrupt again while the task has not ended `RAISE_LOST_INTERRUPT_AFTER_S` after it
    was raised (`scripts/interrupt_fuzz.py --early`: 5 of 440 early Ctrl-Cs were lost without a
    report, and the job trained on). It checks once a second, so that is 4-5 s; and a task must not catch an
    interrupt and go on, or it is raised again.
    """

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.started = False                 # handlers installed (or about to be): stop() restores them
        self.lock = threading.Lock()
        self.done = False
        self.raised = 0                      # interrupts our handler raised
        self.raised_at = 0.0                 # time.monotonic() of the newest

    def interrupt(self, _signum, _frame) -> None:
        if self.done:                        # the task has ended: nothing left to stop
            return
        self.raised += 1
        self.raised_at = time.monotonic()
        error = KeyboardInterrupt()
        error.yolo_admm_count = self.raised  # which interrupt, should it be swallowed
        raise error

    def start(self) -> None:
        if not self.active:
            return
        self.swallowed: queue.SimpleQueue = queue.SimpleQueue()
        self.reporter = threading.Thread(target=self._report_or_raise_again, name="raise-interrupts-again",
                                         daemon=True)
        self.previous_term, self.previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        self.previous_hook = sys.unraisablehook
        self.started = True                  # all that stop() needs to undo what follows, even half done
        signal.signal(signal.SIGTERM, self.interrupt)
        if self.previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, self.interrupt)
        sys.unraisablehook = self.swallowed.put
        self.reporter.start()
        multiprocessing.util.register_after_fork(self, _InterruptGuard._as_before)

    def _report_or_raise_again(self) -> None:
        while True:
            try:
                unraisable = self.swallowed.get(timeout=RAISE_LOST_INTERRUPT_AFTER_S / 4)
            except queue.Empty:
                self._raise_again_if_lost()
                continue
            if unraisable is None:
                return
            interrupted = issubclass(unraisable.exc_type, KeyboardInterrupt)
            if not interrupted:
                self.previous_hook(unraisable)
            seen = getattr(unraisable.exc_value, "yolo_admm_count", self.raised)
            # Its traceback holds the task's frames (and tensors): freed now, not at exit, when a
            # thread that frees a tensor aborts the process.
            del unraisable
            if interrupted:
                time.sleep(0.01)             # the main thread is out of the hook by now (else: back here)
                with self.lock:
                    if not self.done and self.raised == seen:
                        _thread.interrupt_main(signal.SIGTERM)

    def _raise_again_if_lost(self) -> None:
        """Raise the newest interrupt again if the task has not ended long after it."""
        with self.lock:
            late = time.monotonic() - self.raised_at >= RAISE_LOST_INTERRUPT_AFTER_S
            if not self.done and self.raised and late:
                self.raised_at = time.monotonic()      # once per period, while the main thread has not run it
                _thread.interrupt_main(signal.SIGTERM)

    def _as_before(self) -> None:
        """In forked DataLoader workers, which lack the thread, and which multiprocessing stops at
        exit with SIGTERM: a worker that took it as Ctrl-C could hang the exit, waiting to write
        a batch that nobody reads."""
        sys.unraisablehook = self.previous_hook
        signal.signal(signal.SIGTERM, self.previous_term)
        signal.signal(signal.SIGINT, self.previous_int)

    def stop(self) -> None:
        """End the guard; safe to call again after an interrupt cut it short. An interrupt raised
        again just as the task ended is dropped (the handler returns once `done` is set); one that
        lands while `done` is being set is caught here."""
        if not self.started:
            return
        while not self.done:
            try:
                with self.lock:
                    self.done = True
            except KeyboardInterrupt:
                pass
        self._as_before()
        self.swallowed.put(None)
        if self.reporter.ident is not None:  # started
            self.reporter.join()             # what is left is reported (and freed) while the interpreter runs


def _version() -> str:
    """The installed package's version, else pyproject.toml's (run from a checkout without installing)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("yolo-admm")
    except PackageNotFoundError:
        import re
        from pathlib import Path
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
        match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return match.group(1) if match else "(unknown version)"


def _run_task(task: str, module, rest: list[str]) -> int:
    """`module.main(rest)`, with failures turned into one clear line on stderr and an exit status."""
    from engine import NonFiniteLossError
    from engine.distributed import EveryRankError

    try:
        return module.main(rest)
    except KeyboardInterrupt as interrupt:
        hint = f": {interrupt}" if str(interrupt) else ""
        if is_rank0():                               # under torchrun every rank is interrupted: one says so
            print(f"yolo-admm {task}: interrupted{hint}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if _is_peer_failure(err) and not os.environ.get("YOLO_ADMM_DEBUG"):
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            print(f"{_error_label(task)}: another process of this run stopped ({first_line}); "
                  f"its own message says why", file=sys.stderr)
            return 2
        if not (_is_out_of_memory(err) or isinstance(err, NonFiniteLossError)):
            raise
        if os.environ.get("YOLO_ADMM_DEBUG"):
            raise
        print(f"{_error_label(task)}: {_runtime_message(err)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        # Bad input: the message names the file, line or layer. YOLO_ADMM_DEBUG=1 shows the traceback.
        if os.environ.get("YOLO_ADMM_DEBUG"):
            raise
        if is_rank0() or not isinstance(err, EveryRankError):        # the same on every rank: said once
            print(f"{_error_label(task)}: {_strip_worker_traceback(str(err))}", file=sys.stderr)
        return 2


def _error_label(task: str) -> str:
    """"yolo-admm TASK: error", with "(rank N)" under torchrun on ranks other than 0 (a rank's own
    error, or one each rank meets)."""
    return f"yolo-admm {task}: error" + ("" if is_rank0() else f" (rank {os.environ.get('RANK')})")


def _is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another process of the torchrun group went away."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return dist.is_available() and dist.is_initialized() and any(text in str(err) for text in lost)


def _is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), Python's MemoryError, or the CPU allocator's RuntimeError."""
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


def _runtime_message(err: BaseException) -> str:
    """The text for a non-finite loss or an out-of-memory failure, with what to change."""
    if not _is_out_of_memory(err):  # a NonFiniteLossError: its message names the last good checkpoint
        return f"{err}. Lower the learning rate (--lr), or the ADMM penalty (--rho) when pruning."
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"out of memory ({first_line}). Try a smaller --batch-size (for detect train, --accumulate "
            f"keeps the images per optimizer step) or a smaller --img-size; checkpoints written so far are kept.")


def _strip_worker_traceback(message: str) -> str:
    """A DataLoader worker's error message without the worker's traceback: its last line."""
    if _WORKER_TRACEBACK not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def stop_when_orphaned(rank: str, interval_s: float = 2.0) -> threading.Thread:
    """Watch, in a daemon thread, for this process's parent (torchrun's agent) to end, and then end
    this process too. An agent killed with SIGKILL cannot stop its ranks: they would wait for it
    for up to the process group's timeout (hours), holding the run folder. Their checkpoints are
    written atomically, so ending at once loses nothing a resume needs. Started first thing, before
    torch is imported (which takes seconds), so that the parent it watches is the agent."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(f"yolo-admm: rank {rank}: torchrun's agent (pid {parent}) has ended; stopping", file=sys.stderr,
              flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name="stop-when-orphaned", daemon=True)
    thread.start()
    return thread


def _warning_printer(task: str):
    """A `warnings.showwarning` that prints `yolo-admm TASK: warning: MESSAGE` to stderr; under
    torchrun on rank 0 only, as every rank loads the same data and settings and would repeat it."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if is_rank0():
            print(f"yolo-admm {task}: warning: {message}", file=file or sys.stderr)
    return show


if __name__ == "__main__":
    raise SystemExit(main())
