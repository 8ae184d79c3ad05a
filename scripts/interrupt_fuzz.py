"""Ctrl-C fuzz: is every SIGINT sent to a running `classify train` / `detect train` honoured?

Each try starts a small job whose DataLoader forks 2 worker processes at every epoch (and for every
evaluation), waits for its first checkpoint, then sends one SIGINT to the job's main process, mostly
right as the job forks a worker (the moment the 1st to 4th new child process shows up, plus 0-3 ms),
sometimes at a random moment within a second. A try passes when the job exits with 130 and its
"interrupted" line within --grace seconds; a job still running then lost the interrupt (it is
killed). Every "Exception ignored in ..." report on stderr is counted too. With --early the SIGINT
comes instead at a random moment 0.05-2.5 s after the start, mostly while torch is imported. With
--group it goes to the job's whole process group, its DataLoader workers included, as a terminal's
Ctrl-C does.

Reproduce (from the repository root):

    .venv/bin/python scripts/interrupt_fuzz.py --tries 60              # classify train (lenet5)
    .venv/bin/python scripts/interrupt_fuzz.py --tries 30 --task detect
    .venv/bin/python scripts/interrupt_fuzz.py --tries 30 --early
    .venv/bin/python scripts/interrupt_fuzz.py --tries 30 --group

Linux only (reads /proc/PID/task/PID/children).
"""
from __future__ import annotations

import argparse
import gzip
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_mnist_like(root: Path, count: int = 64) -> None:
    """Random 28x28 images with labels 0-9, as MNIST's IDX .gz files (train and t10k)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        images = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for name, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
            with gzip.open(root / f"{split}-{name}-ubyte.gz", "wb") as handle:
                handle.write(header + array.tobytes())


def write_detect_data(root: Path) -> None:
    """A tiny cfg (tiny.cfg) and a 16-image shapes dataset (shapes/data.yaml) under `root`."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from data.synthetic import make_shapes_dataset
    from helpers import tiny_yolo_cfg

    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.cfg").write_text(tiny_yolo_cfg("batch=8\nwidth=64\nheight=64\nchannels=3\n", (8, 16)))
    make_shapes_dataset(root / "shapes", n_train=16, n_val=8, img_size=64, seed=0, size_range=(0.25, 0.5))


def job_command(task: str, data: Path, checkpoints: Path) -> list[str]:
    common = ["--workers", "2", "--batch-size", "8", "--epochs", "100000", "--device", "cpu"]
    if task == "classify":
        return [sys.executable, "-m", "yolo_admm", "classify", "train", "--model", "lenet5", "--data", str(data),
                "--checkpoint-dir", str(checkpoints), "--no-progress", *common]
    return [sys.executable, "-m", "yolo_admm", "detect", "train", "--cfg", str(data / "tiny.cfg"),
            "--data", str(data / "shapes" / "data.yaml"), "--out", str(checkpoints), *common]


def children(pid: int) -> set[int]:
    try:
        return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))
    except OSError:
        return set()


def ignored_exceptions(stderr: str) -> list[str]:
    """'WHERE: EXCEPTION' for each "Exception ignored in WHERE" report in `stderr`."""
    found, where = [], None
    for line in stderr.splitlines():
        if line.startswith("Exception ignored"):
            where = line.removeprefix("Exception ignored in: ")
        elif where is not None and line and not line.startswith((" ", "Traceback")):
            found.append(f"{where}: {line}")
            where = None
    return found


def one_try(command: list[str], folder: Path, rng: random.Random, grace: float, early: bool = False,
            group: bool = False) -> dict:
    """Start the job (`command`, which writes its checkpoints under `folder`/checkpoints), SIGINT it
    after its first epoch at a fork (or at random), or with `early` in its first 2.5 s, and say what
    happened. With `group`, the SIGINT goes to the job's process group."""
    checkpoints = folder / "checkpoints"
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        job = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        at_fork = rng.random() < 0.8 and not early
        forks_to_skip, seen = rng.randrange(0, 4), set()
        while not early and not any(checkpoints.rglob("*.pt")) and job.poll() is None:   # the first epoch has ended
            time.sleep(0.01)
        if early:
            time.sleep(rng.uniform(0.05, 2.5))
        elif at_fork:
            seen = children(job.pid)
            while job.poll() is None:
                new = children(job.pid) - seen
                if new:
                    seen |= new
                    if forks_to_skip == 0:
                        break
                    forks_to_skip -= 1
                time.sleep(0.0002)
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        time.sleep(rng.uniform(0.0, 0.003))
        if job.poll() is not None:
            return {"outcome": "ended before the signal", "rc": job.returncode}
        if group:
            os.killpg(job.pid, signal.SIGINT)
        else:
            job.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            rc = job.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            rc = None
        stop_s = time.monotonic() - sent
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    text = err.read_text(errors="replace")
    ignored = ignored_exceptions(text)
    interrupted = rc == 130 and "interrupted" in text
    outcome = "honoured" if interrupted else "lost" if rc is None else f"exit {rc}"
    return {"outcome": outcome, "rc": rc, "at_fork": at_fork, "stop_s": round(stop_s, 2), "ignored": ignored,
            "stderr_tail": text.strip().splitlines()[-3:] if outcome != "honoured" else []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=60)
    parser.add_argument("--task", choices=("classify", "detect"), default="classify")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds a job may take to stop (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--early", action="store_true", help="SIGINT in the first 2.5 s (while importing)")
    parser.add_argument("--group", action="store_true",
                        help="SIGINT to the job's process group, workers included, as a terminal sends it")
    args = parser.parse_args()
    # A job started in the background of a script inherits SIGINT ignored; handled here, it is
    # reset to the default for the jobs (as exec does to handled signals), which then act on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))              # so a stopped fuzz kills its job
    rng = random.Random(args.seed)
    counts: dict[str, int] = {}
    ignored_total, stop_times = 0, []
    with tempfile.TemporaryDirectory(prefix="interrupt-fuzz-") as scratch:
        data = Path(scratch) / "data"
        if args.task == "classify":
            write_mnist_like(data)
        else:
            write_detect_data(data)
        for number in range(1, args.tries + 1):
            folder = Path(scratch) / f"try{number}"
            folder.mkdir()
            result = one_try(job_command(args.task, data, folder / "checkpoints"), folder, rng, args.grace,
                             args.early, args.group)
            counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
            ignored_total += len(result.get("ignored", []))
            if result["outcome"] == "honoured":
                stop_times.append(result["stop_s"])
            if result["outcome"] != "honoured" or result.get("ignored"):
                print(f"try {number}: {result}", flush=True)
    print(f"{args.tries} tries ({args.task}): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + f"; {ignored_total} 'Exception ignored' reports; honoured within {max(stop_times, default=0):.2f} s "
          f"(median {sorted(stop_times)[len(stop_times) // 2] if stop_times else 0:.2f} s)", flush=True)
    return 0 if set(counts) <= {"honoured", "ended before the signal"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
