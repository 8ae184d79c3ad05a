r"""Global ADMM inside Ultralytics' own trainer (``pruning.UltralyticsADMM``) against one-shot global
magnitude pruning with the same retraining, on a YOLOv8n trained here on the generated shapes.

Nothing downloads: YOLOv8n is built from the yaml that ships with ultralytics and trained from
scratch on ``data.synthetic`` shapes (480 train and 160 val images at 160 px, the demo's dataset),
with Ultralytics' defaults otherwise (AdamW chosen by ``optimizer=auto``, mosaic, warmup). Each
pruning run starts from the dense ``best.pt`` and trains ``admm_iters x epochs_per_iter + retrain``
epochs: ADMM (penalty through the optimizer's step hooks, Z/U-steps at epoch ends), the cut, then
retraining with fixed masks; the magnitude baseline cuts at the start and retrains with the same
masks machinery for all those epochs. mAP is Ultralytics' validator on the 160 val images, for each
run's ``best.pt`` (which ``UltralyticsADMM`` restricts to pruned epochs). Frozen weights (the DFL
convolution) are not pruned; sparsity counts the other convolution weights. The dense model is
short of converged, so the control ``finetune`` trains it for the same epochs with nothing removed:
that, not the dense model, is what the pruned runs are to be measured against.

Reproduce (2-core CPU, no GPU, torch 2.14.1, ultralytics 8.4.190; recorded 2026-11-26/27, about 20
min per seed plus 13 min for the dense model)::

    nohup .venv/bin/python benchmarks/prune_ultralytics.py > /tmp/prune_ultralytics.log 2>&1 &

Seed 1 of the pruning runs from the same dense model (copy ``data`` and ``dense`` into the new root
first; 21 min)::

    mkdir -p runs/bench_ultralytics_seed1 && cp -r runs/bench_ultralytics/{data,dense} runs/bench_ultralytics_seed1/
    .venv/bin/python benchmarks/prune_ultralytics.py --out-root runs/bench_ultralytics_seed1 --seed 1 \
        --json benchmarks/results/prune_ultralytics_seed1.json

Run folders: ``runs/bench_ultralytics/{data,dense,finetune,<method>_<sparsity>}``; the dense model is
trained once and reused, and a run whose ``results.csv`` has all its epochs is read, not trained
again. Writes benchmarks/results/prune_ultralytics.json (rewritten after every run) with each run's
mAP after every epoch (from ``results.csv``) and prints the table of docs/results.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.synthetic import make_shapes_dataset  # noqa: E402
from engine import atomic_write_json  # noqa: E402
from pruning import ADMMConfig, UltralyticsADMM, attach_masks, magnitude_prune  # noqa: E402
from pruning.ultralytics_callbacks import frozen_parameter_names, mask_grads_before_clipping  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "prune_ultralytics.json"


class MagnitudeThenMasks:
    """The baseline: global magnitude pruning when training starts, masks held on every step."""

    def __init__(self, sparsity: float):
        self.sparsity = sparsity
        self.masks = None

    def on_train_start(self, trainer) -> None:
        self.masks = magnitude_prune(trainer.model, self.sparsity, scope="global",
                                     exclude=frozen_parameter_names(trainer.model))
        self.masks.apply(trainer.model, trainer.optimizer, trainer.ema.ema)
        attach_masks(trainer.optimizer, trainer.model, self.masks, trainer.ema.ema)
        mask_grads_before_clipping(trainer, self.masks)

    def register(self, yolo) -> None:
        yolo.add_callback("on_train_start", self.on_train_start)


def train_args(args: argparse.Namespace, name: str, epochs: int) -> dict:
    return dict(data=str(args.data_yaml), epochs=epochs, imgsz=args.img_size, batch=args.batch, device=args.device,
                workers=args.workers, plots=False, verbose=False, seed=args.seed, project=str(args.out_root),
                name=name, exist_ok=True)


def evaluate(yolo_class, weights: Path, args: argparse.Namespace) -> dict:
    """mAP of ``weights`` on the val split, and the zero fraction of its trainable conv weights."""
    model = yolo_class(str(weights))
    metrics = model.val(data=str(args.data_yaml), imgsz=args.img_size, batch=args.batch, device=args.device,
                        plots=False, verbose=False, project=str(args.out_root), name="val", exist_ok=True)
    # a loaded model trains nothing (requires_grad is off everywhere), so the frozen DFL conv goes by name
    convs = [param for name, param in model.model.named_parameters() if param.dim() == 4 and ".dfl." not in name]
    total = sum(param.numel() for param in convs)
    zeros = sum(int((param == 0).sum()) for param in convs)
    return {"map50": round(float(metrics.box.map50), 4), "map50_95": round(float(metrics.box.map), 4),
            "conv_weights": total, "zero_fraction": round(zeros / total, 4)}


def epoch_curves(run_dir: Path) -> dict:
    """mAP50 and mAP50-95 after every epoch, and the training time, from Ultralytics' results.csv."""
    with open(run_dir / "results.csv", newline="") as handle:
        rows = [{key.strip(): value for key, value in row.items()} for row in csv.DictReader(handle)]
    return {"map50_per_epoch": [round(float(row["metrics/mAP50(B)"]), 4) for row in rows],
            "map50_95_per_epoch": [round(float(row["metrics/mAP50-95(B)"]), 4) for row in rows],
            "train_s": round(float(rows[-1]["time"]), 1) if rows else 0.0}


def finished(run_dir: Path, epochs: int) -> bool:
    return (run_dir / "weights" / "best.pt").is_file() and (run_dir / "results.csv").is_file() \
        and len(epoch_curves(run_dir)["map50_per_epoch"]) == epochs


def make_pruner(method: str, sparsity: float, args: argparse.Namespace):
    if method == "admm-global":
        return UltralyticsADMM(ADMMConfig(sparsity=sparsity, rho=args.rho, rho_multiplier=args.rho_mult),
                               admm_iters=args.admm_iters, epochs_per_iter=args.epochs_per_iter)
    return MagnitudeThenMasks(sparsity)


def markdown_table(report: dict) -> str:
    lines = ["| run | removed | mAP50 | mAP50-95 | mAP50 at the cut | train |", "|---|---|---|---|---|---|",
             f"| dense (the start) | 0% | {report['dense']['map50']:.3f} | {report['dense']['map50_95']:.3f} | | |"]
    for run in report["runs"].values():
        cut = run.get("map50_at_cut")
        lines.append(f"| {run['method']} | {run['zero_fraction']:.1%} | {run['map50']:.3f} | {run['map50_95']:.3f} |"
                     f" {'' if cut is None else f'{cut:.3f}'} | {run['train_s'] / 60:.1f} min |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-root", type=Path, default=ROOT / "runs" / "bench_ultralytics")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--dense-epochs", type=int, default=40)
    parser.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",")], default=[0.8, 0.9])
    parser.add_argument("--methods", default="finetune,admm-global,magnitude-global",
                        help="finetune (the control: same epochs, nothing removed), admm-global, magnitude-global")
    parser.add_argument("--admm-iters", type=int, default=4)
    parser.add_argument("--epochs-per-iter", type=int, default=2)
    parser.add_argument("--retrain-epochs", type=int, default=8)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--rho-mult", type=float, default=2.0)
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.out_root = args.out_root.resolve()     # Ultralytics puts a relative project under its own runs_dir
    os.environ.setdefault("YOLO_CONFIG_DIR", str(args.out_root / "ultralytics_config"))
    from ultralytics import YOLO

    started = time.perf_counter()
    data_root = args.out_root / "data"
    args.data_yaml = data_root / "data.yaml"
    if not args.data_yaml.is_file():
        make_shapes_dataset(data_root, n_train=480, n_val=160, img_size=160, seed=0)
    report = {
        "benchmark": "prune_ultralytics", "date": datetime.date.today().isoformat(),
        "machine": "2-core CPU, no GPU" if args.device == "cpu" else args.device,
        "torch": torch.__version__, "ultralytics": __import__("ultralytics").__version__,
        "command": shlex.join([".venv/bin/python", "benchmarks/prune_ultralytics.py", *sys.argv[1:]]),
        "load_average_at_start": os.getloadavg(),
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "runs": {},
    }

    dense_best = args.out_root / "dense" / "weights" / "best.pt"
    if not finished(dense_best.parents[1], args.dense_epochs):
        YOLO("yolov8n.yaml").train(**train_args(args, "dense", args.dense_epochs))
    report["dense"] = {**evaluate(YOLO, dense_best, args), **epoch_curves(dense_best.parents[1])}
    print("dense", {k: v for k, v in report["dense"].items() if "per_epoch" not in k}, flush=True)

    epochs = args.admm_iters * args.epochs_per_iter + args.retrain_epochs
    methods = args.methods.split(",")
    unknown = set(methods) - {"finetune", "admm-global", "magnitude-global"}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}: expected finetune, admm-global or magnitude-global")
    plan = [("finetune", 0.0)] if "finetune" in methods else []
    plan += [(method, sparsity) for sparsity in args.sparsities for method in methods if method != "finetune"]
    for method, sparsity in plan:
        name = "finetune" if method == "finetune" else f"{method}_{sparsity:g}"
        run_dir = args.out_root / name
        if not finished(run_dir, epochs):
            model = YOLO(str(dense_best))
            if method != "finetune":
                make_pruner(method, sparsity, args).register(model)
            model.train(**train_args(args, name, epochs))
        run = {"method": method, "sparsity": sparsity, "epochs": epochs,
               **evaluate(YOLO, run_dir / "weights" / "best.pt", args), **epoch_curves(run_dir)}
        if method == "admm-global":
            run["map50_at_cut"] = run["map50_per_epoch"][args.admm_iters * args.epochs_per_iter - 1]
            run["admm_history"] = json.loads((run_dir / "pruning.json").read_text())["admm_history"]
        elif method == "magnitude-global":
            run["map50_at_cut"] = None      # cut before the first epoch: scored only after one epoch of retraining
        report["runs"][name] = run
        print(name, {k: v for k, v in run.items() if k != "admm_history" and "per_epoch" not in k}, flush=True)
        report["total_wall_s"] = round(time.perf_counter() - started, 1)
        atomic_write_json(args.json, report)
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(args.json, report)
    print(markdown_table(report))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
