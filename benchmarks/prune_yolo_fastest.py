r"""Prune the pretrained yolo-fastest-1.1 on coco128: global ADMM against layer-wise ADMM and two
magnitude baselines, at 50% and 70% sparsity, through the project's pipeline (`detector.prune_pipeline`).

Every method starts from the Darknet weights and gets the same training budget: ADMM methods train
``admm_iters x epochs_per_iter`` epochs under the ADMM penalty, hard-prune, then retrain
``retrain_epochs`` with fixed masks; magnitude methods prune at once and retrain for all those
epochs. Training uses the coco128 train split; mAP (pycocotools, 320x320 plain resize as the cfg)
the 128 coco128 val images. The dense model is evaluated once and shared by every method.

Batch: the pipeline sizes gradient accumulation from the cfg's ``[net] batch`` (32 here: 4 optimizer
steps per epoch of coco128 at batch 8), so this script trains a copy of the cfg whose ``batch``
equals ``--batch-size``: one optimizer step per batch, 16 per epoch, so each ADMM iteration gets 16
W-steps. The copy changes nothing else (same layers, same weights file).

Run folders: ``runs/bench_prune_yolo_fastest/<method>/sparsity_<s>/`` (resumable: rerunning the same
command skips finished stages). The JSON is rewritten after every method, so partial results survive.

Settings (picked by one probe of 2 ADMM iterations at 50%: with rho 0.1 or 1 the primal residual
||W - Z|| did not fall at lr 1e-4, with rho 10 -> 30 it halved): lr 1e-4 (3e-4 and 1e-3 lowered the
pruned model's mAP within 2 epochs), rho 10 x3 per iteration (10, 30, 90), batch 8, no mosaic.

After the hard prune and after retraining the pipeline recomputes the BatchNorm running statistics
on ``--bn-images`` train images (all 128 here; ``--bn-images 0`` reproduces the earlier runs).

Reproduce (11.1 min on a 2-core CPU, no GPU, torch 2.14.1, 2026-11-27, with the code of commit
61992c3: the BatchNorm recalibration passes the [dropout] layers through; every run below was
recorded with it, two at a time, one thread each, load 1.7-4.2, their --out-root under
/tmp/bench_runs2/)::

    nohup .venv/bin/python benchmarks/prune_yolo_fastest.py --threads 1 > /tmp/prune_yolo_fastest.log 2>&1 &

Other seeds of the two global methods at 50% (2.4-4.1 min each, 2026-11-27)::

    .venv/bin/python benchmarks/prune_yolo_fastest.py --threads 1 --methods admm-global,magnitude-global \
        --sparsities 0.5 --seed 1 --out-root runs/bench_prune_yolo_fastest_seed1 \
        --json benchmarks/results/prune_yolo_fastest_seed1.json        (and the same with 2)

The same three seeds with Darknet's colour jitter (commit 92d98c1; 2.0-4.1 min each, 2026-11-28, an
AMD EPYC, seeds 0 and 1 side by side, then 2)::

    .venv/bin/python benchmarks/prune_yolo_fastest.py --threads 1 --methods admm-global,magnitude-global \
        --sparsities 0.5 --seed 0 --out-root runs/bench_prune_yolo_fastest_hsv_seed0 \
        --json benchmarks/results/prune_yolo_fastest_hsv_seed0.json    (and the same with 1, 2)

A twice longer budget (admm 3 x 2 + retrain 6 epochs; 9.3 min)::

    .venv/bin/python benchmarks/prune_yolo_fastest.py --threads 1 --methods admm-global,magnitude-global \
        --epochs-per-iter 2 --retrain-epochs 6 --out-root runs/bench_prune_yolo_fastest_long \
        --json benchmarks/results/prune_yolo_fastest_long.json

Smaller rho, admm-global at 50% (1.2-1.3 min each, 2026-11-27; the JSONs only)::

    .venv/bin/python benchmarks/prune_yolo_fastest.py --threads 1 --methods admm-global --sparsities 0.5 \
        --rho 1 --seed 0 --out-root runs/bench_prune_yolo_fastest_rho1_seed0 \
        --json benchmarks/results/prune_yolo_fastest_rho1_seed0.json    (and seeds 1, 2; and --rho 3)

Progressive ADMM (the Z-step's sparsity rising from 30% over 2 of the 3 iterations; 2.5 min)::

    .venv/bin/python benchmarks/prune_yolo_fastest.py --threads 1 --methods admm-global --ramp-from 0.3 \
        --out-root runs/bench_prune_yolo_fastest_ramp --json benchmarks/results/prune_yolo_fastest_ramp.json

Protected variant: the two 1x1 convs feeding the YOLO heads (``layers.120``, ``layers.129``) never
pruned and every other layer kept at >= 20% density; sparsity then counts the remaining prunable
weights, so 50% / 70% of them is 41.4% / 57.9% of all conv weights. Reproduce
benchmarks/results/prune_yolo_fastest_protected.json (5.2 min on the same 2-core CPU, 2026-11-27)::

    .venv/bin/python benchmarks/prune_yolo_fastest.py --threads 1 --methods admm-global,magnitude-global \
        --exclude 'layers.120.*,layers.129.*' --min-density 0.2 --out-root runs/bench_prune_yolo_fastest_protected \
        --json benchmarks/results/prune_yolo_fastest_protected.json

Writes benchmarks/results/prune_yolo_fastest.json and prune_yolo_fastest.png beside it, and prints
the table of docs/results.md.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from data.sources import load_yolo_dataset
from detector import parse_cfg
from detector.prune_job import METHODS, PruneJob
from detector.prune_pipeline import run_job, sparsity_folder_name
from engine import atomic_write_bytes, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("YOLO_ADMM_SHARED_DATA", REPO.parent / "shared" / "data"))
CFG = SHARED / "darknet" / "yolo-fastest-1.1.cfg"
WEIGHTS = SHARED / "darknet" / "yolo-fastest-1.1.weights"
DATA = SHARED / "coco128" / "coco128.yaml"
METRIC_KEYS = ("map50", "map50_95", "sparsity", "nonzero_prunable", "compact_bytes", "cpu_latency_ms")


def cfg_with_batch(source: Path, target: Path, batch: int) -> Path:
    """Copy a Darknet cfg with ``[net] batch=<batch>`` and ``subdivisions=1`` (nothing else changes).

    Raises:
        ValueError: ``source`` has no ``batch=`` line in its ``[net]`` section.
    """
    lines, section, replaced = [], None, set()
    for line in source.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        key = stripped.split("=", 1)[0].strip()
        if section in ("[net]", "[network]") and "=" in stripped and key in ("batch", "subdivisions"):
            line = f"{key}={batch if key == 'batch' else 1}"
            replaced.add(key)
        lines.append(line)
    if "batch" not in replaced:
        raise ValueError(f"{source}: expected a `batch=` line in the [net] section, found none")
    atomic_write_bytes(target, ("\n".join(lines) + "\n").encode("utf-8"))
    net = parse_cfg(target).net
    if net.batch != batch or net.subdivisions != 1:
        raise ValueError(f"{target}: expected batch={batch}, subdivisions=1, parsed {net.batch}, {net.subdivisions}")
    return target


def make_job(args: argparse.Namespace, cfg: Path, method: str) -> PruneJob:
    """The pipeline job of one method (both sparsities) in ``<out-root>/<method>``."""
    return PruneJob(
        cfg=str(cfg), weights=str(WEIGHTS), data=str(DATA), out=str(args.out_root / method),
        sparsity=list(args.sparsities), method=method, admm_iters=args.admm_iters,
        epochs_per_iter=args.epochs_per_iter, rho=args.rho, rho_mult=args.rho_mult,
        rho_max=max(args.rho_max, args.rho), retrain_epochs=args.retrain_epochs, lr=args.lr, burn_in=0,
        batch_size=args.batch_size, augment=True, mosaic=0.0, workers=0, device="cpu", amp=False, export=[],
        latency_runs=args.latency_runs, seed=args.seed, progress=False,
        exclude=list(args.exclude) or None, min_density=args.min_density, bn_images=args.bn_images,
        ramp_from=args.ramp_from if method.startswith("admm") else None)


def share_dense_record(out_root: Path, methods: list[str]) -> None:
    """Copy the first finished ``dense.json`` into every method folder, so it is evaluated once."""
    found = [out_root / m / "dense.json" for m in methods if (out_root / m / "dense.json").is_file()]
    if not found:
        return
    for method in methods:
        target = out_root / method / "dense.json"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found[0], target)


def summarise_sparsity(result: dict[str, Any]) -> dict[str, Any]:
    """One (method, sparsity) entry of the JSON from the pipeline's per-sparsity results."""
    dense, hard, retrained = result["stages"]
    stages = {record["stage"]: {key: record[key] for key in METRIC_KEYS} for record in (hard, retrained)}
    return {**stages, "measured_sparsity": retrained["sparsity"], "compact_bytes": retrained["compact_bytes"],
            "dense_fp32_bytes": retrained["dense_fp32_bytes"],
            "map50_kept_of_dense": retrained["map50"] / dense["map50"], "wall_time_s": result["wall_time_s"]}


def admm_residuals(out_root: Path, method: str, sparsity: float) -> list[dict] | None:
    """The ADMM residual history the pipeline wrote for one run, or None (magnitude methods)."""
    path = out_root / method / sparsity_folder_name(sparsity) / "admm_residuals.json"
    return json.loads(path.read_text()) if path.is_file() else None


def goal_check(dense: dict[str, Any], methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goal: global ADMM >= 95% of dense mAP50 at 50%, and above every baseline at each ratio."""
    admm = methods.get("admm-global", {})
    checks: dict[str, Any] = {}
    if "0.5" in admm:
        checks["admm_global_keeps_95pct_at_0.5"] = admm["0.5"]["retrained"]["map50"] >= 0.95 * dense["map50"]
    for ratio, entry in admm.items():
        rivals = {m: r[ratio]["retrained"]["map50"] for m, r in methods.items() if m != "admm-global" and ratio in r}
        checks[f"admm_global_beats_all_at_{ratio}"] = all(entry["retrained"]["map50"] > v for v in rivals.values())
        checks[f"best_baseline_map50_at_{ratio}"] = max(rivals.items(), key=lambda kv: kv[1]) if rivals else None
    return checks


def markdown_table(dense: dict[str, Any], methods: dict[str, dict[str, Any]]) -> str:
    """The table of docs/results.md: one row per (sparsity, method), mAP after hard prune and after retraining."""
    lines = ["| sparsity | method | mAP50 hard prune | mAP50 retrained | % of dense mAP50 | mAP50-95 retrained "
             "| measured sparsity | compact size | wall time |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| 0 | dense | {dense['map50']:.3f} | - | 100% | {dense['map50_95']:.3f} | 0% | "
             f"{dense['compact_bytes'] / 1024:.0f} KiB | - |"]
    ratios = sorted({ratio for entries in methods.values() for ratio in entries}, key=float)
    for ratio in ratios:
        for method, entries in methods.items():
            if ratio not in entries:
                continue
            e = entries[ratio]
            lines.append(f"| {float(ratio):.0%} | {method} | {e['hard_prune']['map50']:.3f} | "
                         f"{e['retrained']['map50']:.3f} | {e['map50_kept_of_dense']:.1%} | "
                         f"{e['retrained']['map50_95']:.3f} | {e['measured_sparsity']:.1%} | "
                         f"{e['compact_bytes'] / 1024:.0f} KiB | {e['wall_time_s'] / 60:.1f} min |")
    return "\n".join(lines)


def save_plot(dense: dict[str, Any], methods: dict[str, dict[str, Any]], path: Path) -> Path:
    """mAP50 after retraining against measured sparsity, one line per method (PNG, atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method, entries in methods.items():
        points = sorted((e["measured_sparsity"], e["retrained"]["map50"]) for e in entries.values())
        axes.plot([100 * s for s, _ in points], [m for _, m in points], "o-", label=method)
    axes.axhline(dense["map50"], color="gray", linestyle=":", linewidth=1, label="dense")
    axes.axhline(0.95 * dense["map50"], color="gray", linestyle="--", linewidth=1, label="95% of dense")
    axes.set_xlabel("weights removed (%)")
    axes.set_ylabel("coco128-val mAP50 after retraining")
    axes.set_title("yolo-fastest-1.1, same training budget")
    axes.legend(fontsize=8)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return atomic_write_bytes(path, png.getvalue())


def write_report(args: argparse.Namespace, results: dict[str, dict[str, Any]], dense: dict[str, Any],
                 residuals: dict[str, Any], wall_s: float, load: list[tuple[float, ...]]) -> None:
    """Write the result JSON (atomically) from everything finished so far."""
    report = {
        "benchmark": "prune_yolo_fastest", "date": datetime.date.today().isoformat(),
        "machine": "2-core CPU, no GPU (shared with other jobs)", "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "load_average_at_start_and_now": load,
        "command": shlex.join([".venv/bin/python", "benchmarks/prune_yolo_fastest.py", *sys.argv[1:]]),
        "settings": {"cfg": CFG.name, "weights": WEIGHTS.name,
                     "data": f"coco128 (train: {args.train_images} images; val: 128)",
                     "img_size": 320, "batch_size": args.batch_size, "accumulate": 1,
                     "optimizer_steps_per_epoch": math.ceil(args.train_images / args.batch_size),
                     "lr": args.lr, "burn_in": 0, "augment": True, "mosaic": 0.0,
                     "admm_iters": args.admm_iters, "epochs_per_iter": args.epochs_per_iter,
                     "rho": args.rho, "rho_mult": args.rho_mult, "rho_max": max(args.rho_max, args.rho),
                     "retrain_epochs": args.retrain_epochs,
                     "total_epochs_per_run": args.admm_iters * args.epochs_per_iter + args.retrain_epochs,
                     "sparsities": list(args.sparsities), "seed": args.seed,
                     "exclude": list(args.exclude), "min_density": args.min_density,
                     "bn_images": args.bn_images, "ramp_from": args.ramp_from},
        "dense": {key: dense[key] for key in METRIC_KEYS + ("dense_fp32_bytes",)},
        "methods": results, "admm_residuals": residuals, "goal": goal_check(dense, results),
        "total_wall_time_s": round(wall_s, 1),
    }
    atomic_write_json(args.json, report)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="admm-global,magnitude-global,admm-layerwise,magnitude-uniform",
                        help="comma-separated pipeline methods, run in this order")
    parser.add_argument("--sparsities", default="0.5,0.7", help="comma-separated target sparsities")
    parser.add_argument("--admm-iters", type=int, default=3)
    parser.add_argument("--epochs-per-iter", type=int, default=1)
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rho", type=float, default=10.0)
    parser.add_argument("--rho-mult", type=float, default=3.0)
    parser.add_argument("--rho-max", type=float, default=100.0)
    parser.add_argument("--batch-size", type=int, default=8, help="images per optimizer step")
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", default="",
                        help="comma-separated parameter-name globs never pruned (default: none)")
    parser.add_argument("--min-density", type=float, default=0.0,
                        help="keep at least this fraction of every pruned layer (default: 0, no floor)")
    parser.add_argument("--bn-images", type=int, default=256,
                        help="BatchNorm statistics recomputed on this many train images after pruning (0: off)")
    parser.add_argument("--ramp-from", type=float, default=None,
                        help="progressive ADMM for the admm-* methods: the initial Z's sparsity (default: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-root", type=Path, default=REPO / "runs" / "bench_prune_yolo_fastest")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "prune_yolo_fastest.json", help="result JSON")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    args.exclude = [pattern.strip() for pattern in args.exclude.split(",") if pattern.strip()]
    if not 0.0 <= args.min_density < 1.0:
        parser.error(f"--min-density: expected a fraction in [0, 1), found {args.min_density}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), [os.getloadavg()]
    args.train_images = len(load_yolo_dataset(DATA, "train").records)
    cfg = cfg_with_batch(CFG, args.out_root / f"yolo-fastest-1.1-batch{args.batch_size}.cfg", args.batch_size)
    results: dict[str, dict[str, Any]] = {}
    residuals: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    for method in args.methods:
        share_dense_record(args.out_root, args.methods)
        print(f"--- {method} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        run = run_job(make_job(args, cfg, method))
        dense = run["dense"]
        results[method] = {f"{r['target_sparsity']:g}": summarise_sparsity(r) for r in run["sweep"]}
        for sparsity in args.sparsities:
            history = admm_residuals(args.out_root, method, sparsity)
            if history is not None:
                residuals[f"{method}@{sparsity:g}"] = history
        write_report(args, results, dense, residuals, time.perf_counter() - started, load + [os.getloadavg()])
        print(markdown_table(dense, results), flush=True)
    save_plot(dense, results, args.json.with_suffix(".png"))
    print(f"\nwrote {args.json} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
