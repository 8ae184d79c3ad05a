"""Reading a COCO-sized instances json: wall time and memory of `data.sources.load_coco_json`, the
first thing `detect prune` and `detect train` do with COCO (once per process, so once per rank under
torchrun), against a plain ``json.load`` of the same file (what it did before it dropped the
segmentation polygons as they are parsed).

The json is generated with instances_train2017.json's counts (118,287 images, 860,001
annotations, 80 categories) and its fields, each annotation with one 40-coordinate polygon, about
425 MB (the real file is 448 MB); the images are empty files (the loader only checks that they
exist). Each measurement runs in a fresh process, so its peak RSS (``VmHWM``) is its own:

- ``json_load``: ``json.load`` of the file alone;
- ``load_coco_json``: the loader, then RSS after it (``retained_mib``: what the records keep, over
  the RSS before it, which includes torch); then a DataLoader with ``--workers`` forked workers
  that reads every record once, and each worker's private memory at the end (the pages it copied:
  reading a Python object writes its reference count).

Reproduce: ``nice .venv/bin/python benchmarks/coco_index.py`` (writes
benchmarks/results/coco_index.json; the generated data go to a temporary folder, or to ``--dir``,
where they are kept and reused). Medians over ``--repeats`` runs. Recorded 2026-11-27 on this
project's 2-core CPU, shared with another job (load average in the JSON): ``json.load`` 16.7 s and a
peak of 2,940 MiB; ``load_coco_json`` 17.3 s, a peak of 1,552 MiB (573 MiB of it torch and the
imports, before the file is opened), 422 MiB kept by the records, 65 MiB copied by each worker.
The loader before it dropped the polygons (commit 710abe3, its ``--measure load_coco_json`` run
twice on the same generated file right after): 23.2 s and a peak of 3,001 MiB.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from engine import atomic_write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "coco_index.json"
TRAIN2017 = {"images": 118_287, "annotations": 860_001, "categories": 80}


def make_coco_scale_folder(folder: Path, images: int, annotations: int, seed: int = 0) -> Path:
    """`folder/images/train2017/*.jpg` (empty files) and `folder/annotations/instances_train2017.json`
    with COCO's fields; returns the json's path (kept when it is there already)."""
    json_path = folder / "annotations" / "instances_train2017.json"
    if json_path.is_file():
        return json_path
    rng = random.Random(seed)
    image_dir = folder / "images" / "train2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    image_entries = []
    for image_id in range(1, images + 1):
        name = f"{image_id:012d}.jpg"
        (image_dir / name).touch()
        image_entries.append({"license": 3, "file_name": name, "coco_url": f"http://example.invalid/{name}",
                              "height": 480, "width": 640, "date_captured": "2013-11-14 11:18:45",
                              "flickr_url": f"http://example.invalid/{name}", "id": image_id})
    annotation_entries = []
    for annotation_id in range(1, annotations + 1):
        x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 380), rng.uniform(2, 140), rng.uniform(2, 100)
        polygon = [round(rng.uniform(0, 640), 2) for _ in range(40)]
        annotation_entries.append({"segmentation": [polygon], "area": round(w * h, 4), "iscrowd": 0,
                                   "image_id": rng.randint(1, images),
                                   "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                                   "category_id": rng.randint(1, TRAIN2017["categories"]), "id": annotation_id})
    categories = [{"supercategory": "thing", "id": i, "name": f"class{i}"}
                  for i in range(1, TRAIN2017["categories"] + 1)]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    partial = json_path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as stream:
        json.dump({"info": {}, "licenses": [], "images": image_entries, "annotations": annotation_entries,
                   "categories": categories}, stream)
    partial.replace(json_path)
    return json_path


def _status_mib(field: str, pid: int | str = "self") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def _rss_mib(pid: int | str = "self") -> float:
    return _status_mib("VmRSS", pid)


def _private_mib(pid: int) -> float:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean", "Private_Dirty"))) / 1024


def _peak_mib() -> float:
    """This process's peak RSS since it started: VmHWM, not ``ru_maxrss``, which Linux carries over
    from the parent that forked it (through exec), so it would report the generator's memory."""
    return _status_mib("VmHWM")


def measure_json_load(json_path: Path) -> dict:
    start = time.perf_counter()
    with open(json_path, encoding="utf-8") as stream:
        json.load(stream)
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": _peak_mib()}


class _RecordReader:
    """A dataset that reads each record's fields (no image), as a training dataset's lookup does."""

    def __init__(self, records: list):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> int:
        record = self.records[index]
        return len(record.boxes) + len(record.classes) + len(str(record.path))


def measure_loader(json_path: Path, workers: int) -> dict:
    import torch

    from data.sources import load_coco_json
    before = _rss_mib()
    start = time.perf_counter()
    source = load_coco_json(json_path.parents[1] / "images" / "train2017", json_path)
    wall = time.perf_counter() - start
    peak = _peak_mib()
    gc.collect()
    result = {"wall_s": wall, "peak_rss_mib": peak, "rss_before_mib": before,
              "retained_mib": _rss_mib() - before, "records": len(source.records),
              "objects": int(sum(len(r.classes) for r in source.records))}
    loader = torch.utils.data.DataLoader(_RecordReader(source.records), batch_size=512, num_workers=workers)
    batches = iter(loader)
    for index, _ in enumerate(batches):
        if index == len(loader) - 2 * workers:      # every worker has read nearly all its records
            result["worker_private_mib"] = [_private_mib(w.pid) for w in batches._workers]
    return result


def _in_fresh_process(kind: str, json_path: Path, workers: int) -> dict:
    command = [sys.executable, __file__, "--measure", kind, "--json", str(json_path), "--workers", str(workers)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _medians(runs: list[dict]) -> dict:
    summary = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            summary[key] = statistics.median(run[key] for run in runs)
        elif isinstance(value, list):
            summary[key] = statistics.median(max(run[key]) for run in runs)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the generated data go (kept)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure", choices=["json_load", "load_coco_json"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:                                     # the child process: one measurement
        if args.measure == "json_load":
            measured = measure_json_load(args.json)
        else:
            measured = measure_loader(args.json, args.workers)
        print(json.dumps(measured))
        return measured
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.dir or Path(scratch)
        start = time.perf_counter()
        json_path = make_coco_scale_folder(folder, TRAIN2017["images"], TRAIN2017["annotations"])
        generated_s = time.perf_counter() - start
        load_before = list(os.getloadavg())
        runs = {"json_load": [], "load_coco_json": []}
        for _ in range(args.repeats):
            for kind, kind_runs in runs.items():
                kind_runs.append(_in_fresh_process(kind, json_path, args.workers))
        result = {
            "benchmark": "coco_index", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})",
            "python": platform.python_version(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "json_bytes": json_path.stat().st_size, "generate_s": generated_s, **TRAIN2017,
            "dataloader_workers": args.workers, "load_average_at_start": load_before,
            "median": {kind: _medians(kind_runs) for kind, kind_runs in runs.items()},
            "runs": runs, "load_average_at_end": list(os.getloadavg()),
        }
    atomic_write_json(args.out, result)
    print(json.dumps(result["median"], indent=2))
    return result


if __name__ == "__main__":
    main()
