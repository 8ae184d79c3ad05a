"""Eval throughput of yolo-fastest-1.1 on coco128 val (128 images, 320x320): ours vs OpenCV DNN.

Reproduce (from the repository root, with ../shared/data present):

    .venv/bin/python benchmarks/eval_speed.py            # writes benchmarks/results/eval_speed.json

Measured on a 2-core CPU, no GPU, shared with other jobs (the load average is recorded in the JSON),
2026-11-25.

Both pipelines do the same work, timed from the first image read to the COCO metrics:
- ours: `detect eval` as a library call: DataLoader over `data.InferenceDataset` (cv2 read, plain
  resize), `detector.evaluate` (inference copy of the model, post-process, pycocotools).
- opencv: the reference pipeline of tests/test_map_reference.py: cv2.imread, blobFromImage,
  `cv2.dnn` forward, NMSBoxesBatched, pycocotools.
Untimed in both: interpreter start, imports, loading the network and the ground truth.

Every run is its own child process, so its peak RSS (ru_maxrss of the child) belongs to that pipeline
alone; "before eval" is the RSS after imports and loading (for ours mostly the CUDA builds of torch and
torchvision). DataLoader worker processes (workers=1 only) are not counted. torch and OpenCV get the
same thread count. Runs are interleaved, repeat by repeat, so that changing machine load hits all
pipelines alike; the JSON gives every run and the medians.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YOLO_ADMM_SHARED_DATA", REPO.parent / "shared" / "data"))
CFG = SHARED / "darknet" / "yolo-fastest-1.1.cfg"
WEIGHTS = SHARED / "darknet" / "yolo-fastest-1.1.weights"
COCO128 = SHARED / "coco128"
RESULTS = REPO / "benchmarks" / "results" / "eval_speed.json"


def load_reference_module():
    """tests/test_map_reference.py, where the OpenCV reference pipeline lives (it imports tests/helpers.py)."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    spec = importlib.util.spec_from_file_location("test_map_reference", REPO / "tests" / "test_map_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_ours(batch_size: int, workers: int) -> dict:
    import torch

    import detector
    from data.eval_dataset import InferenceDataset
    from data.sources import load_yolo_dataset
    from detector.evaluate import evaluate
    from detector.predict import make_loader

    model = detector.load_darknet(CFG, WEIGHTS)
    source = load_yolo_dataset(COCO128 / "coco128.yaml", split="val")
    rss_before = current_rss_mb()
    start = time.perf_counter()
    dataset = InferenceDataset.from_source(source, 320, 320, letterbox=bool(model.net.letter_box))
    loader = make_loader(dataset, batch_size, workers, torch.device("cpu"))
    result = evaluate(model, loader, source, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": result.images, "map50_95": result.map50_95, "map50": result.map50,
            "rss_before_eval_mb": rss_before}


def run_opencv() -> dict:
    import cv2

    reference = load_reference_module()
    with tempfile.TemporaryDirectory() as work:
        cfg = reference.cfg_with_yolo_thresh(CFG, reference.CONF, Path(work) / "reference.cfg")
        net = cv2.dnn.readNetFromDarknet(str(cfg), str(WEIGHTS))
    gt, paths = reference.reference_ground_truth(COCO128 / "images" / "val2017", COCO128 / "labels" / "val2017", 80)
    rss_before = current_rss_mb()
    start = time.perf_counter()
    results = [r for path in paths for r in reference.opencv_detections(net, path, int(path.stem))]
    stats = reference.pycocotools_stats(gt, results)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(paths), "map50_95": float(stats[0]), "map50": float(stats[1]),
            "rss_before_eval_mb": rss_before}


def child_main(args: argparse.Namespace) -> None:
    """One timed run in this process; prints its JSON record on the last line of stdout."""
    import cv2

    cv2.setNumThreads(args.threads)
    if args.child == "ours":  # the OpenCV child never imports torch
        import torch

        torch.set_num_threads(args.threads)
    record = run_ours(args.batch_size, args.workers) if args.child == "ours" else run_opencv()
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(record))


# name, pipeline, threads (torch and OpenCV), DataLoader workers, extra environment
CONFIGS = (
    ("opencv/threads=1", "opencv", 1, 0, {}),
    ("opencv/threads=2", "opencv", 2, 0, {}),
    ("ours/threads=1", "ours", 1, 0, {}),
    ("ours/threads=1/workers=1", "ours", 1, 1, {}),
    ("ours/threads=2", "ours", 2, 0, {}),
    ("ours/threads=2/OMP_WAIT_POLICY=passive", "ours", 2, 0, {"OMP_WAIT_POLICY": "passive"}),
)


def spawn(pipeline: str, threads: int, workers: int, batch_size: int, env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--child", pipeline, "--threads", str(threads),
               "--workers", str(workers), "--batch-size", str(batch_size)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, **env})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"images_per_s_median": runs[0]["images"] / seconds, "seconds_median": seconds,
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
            "rss_before_eval_mb_median": statistics.median(r["rss_before_eval_mb"] for r in runs),
            "map50_95": runs[0]["map50_95"], "map50": runs[0]["map50"], "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", choices=("ours", "opencv"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    runs: dict[str, list[dict]] = {name: [] for name, *_ in CONFIGS}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        for name, pipeline, threads, workers, env in CONFIGS:
            runs[name].append(spawn(pipeline, threads, workers, args.batch_size, env))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
    summary = {name: summarise(r) for name, r in runs.items()}
    ratios = {name: s["images_per_s_median"] / summary[f"opencv/threads={threads}"]["images_per_s_median"]
              for (name, pipeline, threads, _, _), s in zip(CONFIGS, summary.values()) if pipeline == "ours"}
    report = {"benchmark": "eval_speed", "date": date.today().isoformat(),
              "machine": f"{os.cpu_count()}-core CPU, no GPU, shared with other jobs",
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "model": "yolo-fastest-1.1 @320", "data": "coco128 val (128 images)", "batch_size": args.batch_size,
              "repeats": args.repeats, "ratio_ours_over_opencv_same_threads": ratios, "pipelines": summary}
    from engine import atomic_write_json  # here, so this parent process stays torch-free
    atomic_write_json(RESULTS, report)
    for name, s in summary.items():
        print(f"{name:<40} {s['images_per_s_median']:7.1f} images/s  peak RSS {s['peak_rss_mb_median']:.0f} MB "
              f"({s['rss_before_eval_mb_median']:.0f} MB before eval)  mAP50 {s['map50']:.4f}")
    print("ours / opencv images/s at the same thread count:", {k: round(v, 3) for k, v in ratios.items()})


if __name__ == "__main__":
    main()
