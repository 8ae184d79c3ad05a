"""`yolo-admm TASK MODE [options]`: the one command-line entry point.

Each task owns its modes in its own package (`detector.cli`, `classify.cli`); this module only
dispatches, so `yolo-admm detect --help` and `yolo-admm classify prune --help` are the tasks' own.
"""
from __future__ import annotations

import importlib
import os
import sys

TASKS = {
    "detect": ("detector.cli", "Darknet YOLO detectors: predict, eval, train, prune, export"),
    "classify": ("classify.cli", "classifiers (LeNet-5, ResNet-56): train, eval, prune"),
}

USAGE = "usage: yolo-admm TASK MODE [options]\n\ntasks:\n" + "".join(
    f"  {name:<10}{summary}\n" for name, (_, summary) in TASKS.items()
) + "\nRun `yolo-admm TASK --help` for the modes of a task."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        print(f"yolo-admm: unknown task {task!r}; expected one of {', '.join(TASKS)}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    # Before torch is first imported: OpenMP threads that spin-wait for each other make torch
    # several times slower on a busy machine (measured in benchmarks/eval_speed.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = importlib.import_module(TASKS[task][0])
    try:
        return module.main(rest)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        # Bad input: the message names the file, line or layer. YOLO_ADMM_DEBUG=1 shows the traceback.
        if os.environ.get("YOLO_ADMM_DEBUG"):
            raise
        print(f"yolo-admm {task}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"yolo-admm {task}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
