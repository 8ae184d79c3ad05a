"""Sanity check of the loss, labels and trainer on real weights: fine-tune yolo-fastest-1.1 on coco128.

1. coco128-val mAP50 (pycocotools, 320x320 plain resize as the cfg) of the pretrained
   yolo-fastest-1.1 weights.
2. The loss of the pretrained model on coco128-val with its true labels, with x/y swapped labels and,
   for scale, of a randomly initialised model: a loss or label-format mismatch shows here at once.
3. `detect train` machinery (`detector.train.fit_detector`) for a few epochs on coco128 train at a
   low learning rate (the cfg's augmentation, with its [yolo] jitter; batch 8 x 4 accumulated = the
   cfg's batch 32), then the coco128-val mAP50 again. Goal: after >= 90% of before.

Reproduce: ``.venv/bin/python benchmarks/finetune_sanity.py --threads 1`` (5 epochs at lr 1e-4;
writes benchmarks/results/finetune_sanity.json) and, for contrast, ``... --threads 1 --lr 1e-3
--out benchmarks/results/finetune_sanity_lr1e-3.json`` (the cfg's initial learning rate, 100x the
1e-5 its schedule ends at); other seeds: ``--seed 1 --out benchmarks/results/finetune_sanity_seed1.json``
(and ``_lr1e-3_seed1``, 2 likewise). Measured on a 2-core CPU, no GPU, one run at a time beside
another benchmark (43-47 s of training each), torch 2.14.1, 2026-11-27, after that day's jitter change
and the 2 px box limit on the output.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from data.augment import AugmentConfig
from data.sources import load_yolo_dataset
from data.train_dataset import DetectionTrainDataset, collate_detection
from detector import load_darknet
from detector.loss import YoloLoss
from detector.train import DetectTrainConfig, ValidationMap, darknet_augmentation, fit_detector
from engine import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("YOLO_ADMM_SHARED_DATA", REPO.parent / "shared" / "data"))
CFG = SHARED / "darknet" / "yolo-fastest-1.1.cfg"
WEIGHTS = SHARED / "darknet" / "yolo-fastest-1.1.weights"
DATA = SHARED / "coco128" / "coco128.yaml"
SIZE = 320


@torch.no_grad()
def mean_loss(model, source, swap_xy: bool = False, batch: int = 16) -> float:
    """Mean per-image YoloLoss of `model` (train-mode outputs, BN in eval mode) on `source`."""
    dataset = DetectionTrainDataset(source, AugmentConfig(SIZE), augment=False)
    loss_fn = YoloLoss(model.heads)
    model.eval()
    for head in model.heads:
        head.train()  # raw outputs, with BatchNorm on its running statistics
    total = 0.0
    for start in range(0, len(dataset), batch):
        images, targets = collate_detection([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        if swap_xy:
            targets = targets[:, [0, 1, 3, 2, 5, 4]]
        total += float(loss_fn(model(images), targets, (SIZE, SIZE))[0]) * len(images)
    model.eval()
    return total / len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed: shuffles, augmentation, dropout")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "finetune_sanity.json", help="result JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, val = load_yolo_dataset(DATA, "train"), load_yolo_dataset(DATA, "val")
    model = load_darknet(CFG, WEIGHTS)
    evaluator = ValidationMap(val, SIZE, letterbox=False, batch_size=16, workers=0, device=torch.device("cpu"))
    before = evaluator(model)
    losses = {"pretrained_true_labels": mean_loss(model, val),
              "pretrained_xy_swapped_labels": mean_loss(model, val, swap_xy=True),
              "random_init_true_labels": mean_loss(load_darknet(CFG), val)}
    print(f"before: mAP50 {before['map50']:.4f}; losses {losses}")
    config = DetectTrainConfig(epochs=args.epochs, batch_size=args.batch_size, accumulate=32 // args.batch_size,
                               lr=args.lr, burn_in=0, eval_every=args.epochs, workers=0, device="cpu",
                               progress=False)
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    started = time.perf_counter()
    trainer = fit_detector(model, train, None, config)
    seconds = time.perf_counter() - started
    after = evaluator(model)
    ratio = after["map50"] / before["map50"]
    final = torch.cat([p.detach().flatten() for p in model.parameters()])
    weight_change = float((final - initial).norm() / initial.norm())
    print(f"after {args.epochs} epochs ({seconds:.0f} s): mAP50 {after['map50']:.4f} ({100 * ratio:.1f}% of before)")
    report = {
        "benchmark": "finetune_sanity", "date": datetime.date.today().isoformat(), "machine": "2-core CPU, no GPU",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "settings": {"cfg": CFG.name, "img_size": SIZE, "epochs": args.epochs, "lr": args.lr, "burn_in": 0,
                     "seed": args.seed,
                     "batch_size": args.batch_size, "accumulate": 32 // args.batch_size,
                     "augment": asdict(darknet_augmentation(model.cfg, SIZE)),
                     "train_images": len(train.records), "val_images": len(val.records)},
        "val_loss_per_image": losses,
        "before": before, "after": after, "after_over_before_map50": round(ratio, 4), "goal": ">= 0.90",
        "passed": ratio >= 0.9,
        "train_loss_per_epoch": [round(h["train/loss"], 4) for h in trainer.history],
        "optimizer_steps": trainer.step, "relative_weight_change": round(weight_change, 5),
        "train_seconds": round(seconds, 1),
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
