"""Detector training throughput: images per second of one SGD step, and peak memory.

Models (random initialisation; speed does not depend on the weights): yolo-fastest-1.1 at 320x320
and yolov4-tiny at 416x416, batch 8, on coco128 train batches made by the training pipeline
(`data.train_dataset` with the cfg's augmentation). A step is forward + `detector.loss.YoloLoss` +
backward + `optimizer.step()`; batches are prepared beforehand, and the data pipeline's own rate
(augmentation incl. decoding, one process) is reported separately. Each model runs in its own
subprocess so that its peak memory is its own: peak RSS of the process on CPU (this includes
the prepared batches, about 15 MB per batch at 320 and 25 MB at 416), and
`torch.cuda.max_memory_allocated` on CUDA (where yolov4 at 608 with AMP is measured too).
Medians over the timed steps (after warm-up steps). Then, on the same model, ADMM (sparsity 0.8)
is set up and plain steps alternate with ADMM steps (penalty gradient added after unscaling):
`admm_step_over_plain_step` is the ratio of their medians (`admm_median_step_s`,
`plain_interleaved_median_step_s`), `admm_state_mib` the GPU memory ADMM's state takes and
`admm_peak_memory_mib` the peak from its construction on. The GPU JSON of 2026-11-26 predates
`plain_interleaved_median_step_s`, `admm_state_mib` and the peak reset (its ADMM peak is the whole
run's).

Reproduce: ``.venv/bin/python benchmarks/train_speed.py --threads 1`` (writes
benchmarks/results/train_speed.json). Measured on a 2-core CPU, no GPU, shared with other jobs
(load average ~8, see ``load_average_before_after`` in the JSON; under that load torch's default
2 threads ran yolo-fastest steps 3-15x slower than 1 thread, hence --threads 1), torch 2.14.1,
2026-11-25 (that JSON predates the ADMM fields).

GPU: ``python3 benchmarks/train_speed.py --threads 4 --out benchmarks/results/train_speed_cuda.json``
(2026-11-26, NVIDIA H200, 16 CPU cores, torch 2.11.0+cu130; the first 64 coco128 train images).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_speed.json"
SHARED = Path(os.environ.get("YOLO_ADMM_SHARED_DATA", REPO.parent / "shared" / "data"))
CPU_CASES = [("yolo-fastest-1.1", 320, False), ("yolov4-tiny", 416, False)]
CUDA_CASES = CPU_CASES + [("yolov4", 608, False), ("yolov4", 608, True)]


def measure_one(name: str, size: int, amp: bool, batch: int, steps: int, warmup: int, device: str) -> dict:
    """Time `steps` training steps of one model (in this process)."""
    from data.sources import load_yolo_dataset
    from data.train_dataset import DetectionTrainDataset, collate_detection
    from detector import load_darknet
    from detector.loss import YoloLoss
    from detector.train import build_optimizer, darknet_augmentation
    from pruning import ADMM, ADMMConfig

    torch.manual_seed(0)
    model = load_darknet(SHARED / "darknet" / f"{name}.cfg").to(device).train()
    source = load_yolo_dataset(SHARED / "coco128" / "coco128.yaml", "train")
    dataset = DetectionTrainDataset(source, darknet_augmentation(model.cfg, size))
    started = time.perf_counter()
    batches = [collate_detection([dataset[(i * batch + j) % len(dataset)] for j in range(batch)])
               for i in range(warmup + steps)]
    data_rate = (warmup + steps) * batch / (time.perf_counter() - started)
    loss_fn = YoloLoss(model.heads)
    optimizer = build_optimizer(model, 1e-4, model.net.momentum, model.net.decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step(images: torch.Tensor, targets: torch.Tensor, admm: ADMM | None) -> float:
        images, targets = images.to(device), targets.to(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.float16, enabled=amp):
            loss, _ = loss_fn(model(images), targets, (size, size))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if admm is not None:
            admm.add_penalty_grad()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    times = [step(images, targets, None) for images, targets in batches]
    plain_step = statistics.median(times[warmup:])
    peak = _peak_memory(device)
    # ADMM: its state (Z, U, U - Z: three copies of the prunable weights) and, interleaved with
    # plain steps on the same model, the step with the penalty gradient added.
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before_admm = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    admm = ADMM(model, ADMMConfig(sparsity=0.8, rho=1e-3))
    admm_state = torch.cuda.memory_allocated() - before_admm if device.startswith("cuda") else None
    plain_again, with_admm = [], []
    for index, (images, targets) in enumerate(batches):
        order = (None, admm) if index % 2 == 0 else (admm, None)
        for which in order:
            (plain_again if which is None else with_admm).append(step(images, targets, which))
    admm_ratio = statistics.median(with_admm[warmup:]) / statistics.median(plain_again[warmup:])
    return {"model": name, "img_size": size, "batch": batch, "amp": amp, "device": device,
            "median_step_s": round(plain_step, 4), "images_per_s": round(batch / plain_step, 2),
            "step_s_min_max": [round(min(times[warmup:]), 4), round(max(times[warmup:]), 4)],
            "peak_memory_mib": round(peak / 2**20, 1),
            "peak_memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "process peak RSS",
            "admm_step_over_plain_step": round(admm_ratio, 4),
            "admm_median_step_s": round(statistics.median(with_admm[warmup:]), 4),
            "plain_interleaved_median_step_s": round(statistics.median(plain_again[warmup:]), 4),
            "admm_peak_memory_mib": round(_peak_memory(device) / 2**20, 1),
            "admm_state_mib": None if admm_state is None else round(admm_state / 2**20, 1),
            "data_pipeline_images_per_s": round(data_rate, 2), "timed_steps": steps, "warmup_steps": warmup}


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=3, metavar=("NAME", "SIZE", "AMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:  # child process: one model, result as JSON on stdout
        name, size, amp = args.one[0], int(args.one[1]), args.one[2] == "1"
        print(json.dumps(measure_one(name, size, amp, args.batch, args.steps, args.warmup, device)))
        return
    load_before = os.getloadavg()
    results = []
    for name, size, amp in CUDA_CASES if device == "cuda" else CPU_CASES:
        command = [sys.executable, __file__, "--one", name, str(size), "1" if amp else "0",
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    report = {"benchmark": "train_speed", "date": datetime.date.today().isoformat(),
              "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), "
              + (f"GPU {torch.cuda.get_device_name()}" if device == "cuda" else "no GPU"),
              "torch": torch.__version__, "torch_threads": args.threads or torch.get_num_threads(),
              "load_average_before_after": [list(load_before), list(os.getloadavg())], "results": results}
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
