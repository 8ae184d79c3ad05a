"""ResNet-56 on CIFAR-10 from the pretrained checkpoint: its accuracy on our JPEG test set, then a
removal sweep (10, 30, 50, 70, 90 %) of global ADMM against global magnitude pruning, on a short
budget that fits a shared 2-core CPU.

Reproduce (from the repository root):

    nice .venv/bin/python benchmarks/resnet56_cifar10.py --data ../shared/data/cifar10 \\
        --weights ../shared/data/resnet56/resnet56-4bfd9763.th --parallel 2

Writes benchmarks/results/resnet56_cifar10.json (re-written after every run) and prints a markdown
table. Recorded results: 2026-11-27, 2-core CPU, no GPU, torch 1 thread per run, two runs at once
(load average about 2.5, see "load_average" per run in the JSON): 0.75 min per run, 6.6 min for the
whole sweep. The same command with --seed 1 / --seed 2 --out .../resnet56_cifar10_seed{1,2}.json,
and for ADMM at other rhos with --methods admm-global --no-control and --rho 0.01 --rho-mult 1.778
(.../resnet56_cifar10_rho0.01.json) or --rho 2 --rho-mult 2 (.../resnet56_cifar10_rho2.json), and
at 90% with one ADMM epoch and three retraining epochs, --sparsities 0.9 --methods admm-global
--no-control --admm-iters 1 --retrain-epochs 3 --seed 0|1|2 (.../resnet56_cifar10_admm1_seed{0,1,2}.json).
(The first recording, 2026-11-25, ran at load 6-9, where 2 threads trained at 5.8 img/s against
21 img/s for 1 thread; 53 min for the sweep.)

Budget (the defaults): an "epoch" is a random draw of 768 training images (JPEG, random crop +
flip, batch 64, i.e. 12 steps); ADMM runs 2 iterations of one such epoch (SGD Nesterov lr 0.01,
weight decay 1e-4, rho 0.5 then 1.0), then 2 epochs of masked retraining (cosine LR); global
magnitude prunes once and retrains for all 4 epochs: every run trains on 3,072 images in all. A
control run (sparsity 0, same budget, no pruning) shows what fine-tuning alone does on our JPEGs.
The dense accuracy is measured on the full 10k test set; the sweep evaluates every run on the same
fixed subset of 1,000 test images (drawn by --seed).

GPU runs (2026-11-26, one NVIDIA H200, 16 CPU cores, torch 2.11.0+cu130, AMP), the data copied
to /tmp/data; all 10k test images. The full sweep, 3 passes over the 50k training images per run,
all 11 runs sharing the GPU (4.6 min; the schedule was sized by a 1-epoch probe to fit the lease):

    python3 benchmarks/resnet56_cifar10.py --data /tmp/data/cifar10 \\
        --weights /tmp/data/resnet56/resnet56-4bfd9763.th --device cuda --parallel 11 --workers 2 \\
        --batch-size 128 --train-samples 0 --eval-samples 0 --admm-iters 2 --epochs-per-iter 1 \\
        --retrain-epochs 1 --rho 0.3 --rho-mult 10 --out benchmarks/results/resnet56_cifar10_cuda.json

and 70 / 90 % with 5 passes per run (10 epochs of 25k images), 4 runs at once (3.1 min):

    python3 benchmarks/resnet56_cifar10.py --data /tmp/data/cifar10 \\
        --weights /tmp/data/resnet56/resnet56-4bfd9763.th --device cuda --parallel 4 --workers 3 \\
        --batch-size 128 --sparsities 0.7,0.9 --no-control --train-samples 25000 --eval-samples 0 \\
        --admm-iters 5 --epochs-per-iter 1 --retrain-epochs 5 --rho 0.3 --rho-mult 1.778 \\
        --out benchmarks/results/resnet56_cifar10_cuda_long.json

Second lease (2026-11-26, one NVIDIA H100 80GB HBM3, same software; the two sweeps at once, data
in /tmp/data): 3.2 passes per run (10 epochs of 16k images), a cosine LR over the ADMM phase, all
ratios (4.8 min), beside the constant LR at 70 / 90 %:

    COMMON="--data /tmp/data/cifar10 --weights /tmp/data/resnet56/resnet56-4bfd9763.th --device cuda
        --workers 1 --batch-size 128 --no-control --train-samples 16000 --eval-samples 0 --admm-iters 5
        --epochs-per-iter 1 --retrain-epochs 5 --rho 0.3 --rho-mult 1.778"
    python3 benchmarks/resnet56_cifar10.py $COMMON --parallel 10 --admm-lr cosine \\
        --out benchmarks/results/resnet56_cifar10_cuda_cosine.json
    python3 benchmarks/resnet56_cifar10.py $COMMON --parallel 2 --methods admm-global --sparsities 0.7,0.9 \\
        --admm-lr constant --out benchmarks/results/resnet56_cifar10_cuda_constant.json

then 6.4 passes (10 epochs of 32k images, --workers 2, --parallel 4, --sparsities 0.7,0.9) with the
constant LR (resnet56_cifar10_cuda_6pass.json), and ADMM alone with --admm-iters 3 --retrain-epochs 7
--rho-mult 3.162 (_6pass_admm3.json) or --rho 1.0 (_6pass_rho1.json). Each JSON holds its command.

Third lease (2026-11-26, one NVIDIA H100 80GB HBM3, same software), ADMM's LR one cosine over all
its epochs (--admm-lr shared): $COMMON with --admm-lr shared, all ratios of both methods at
--parallel 10 (resnet56_cifar10_cuda_shared.json) beside ADMM alone at 70 / 90 % with
--train-samples 32000 --parallel 2 (_cuda_6pass_shared.json), 5.8 min; then --rho 0.03
--sparsities 0.1,0.5,0.9 --methods admm-global --parallel 3 (_cuda_shared_rho0.03.json), 2.1 min.

Fourth lease (2026-11-26, one NVIDIA H100 80GB HBM3, same software; workers now restart every
epoch), 6.4 passes at 70 / 90 % with the constant ADMM LR, four invocations at once (7.4 min, beside
the CUDA tests): global magnitude again, and ADMM with --rho 0.01, 0.03 and 0.1 (x1.778):

    COMMON="--data /tmp/data/cifar10 --weights /tmp/data/resnet56/resnet56-4bfd9763.th --device cuda
        --workers 1 --batch-size 128 --no-control --train-samples 32000 --eval-samples 0 --admm-iters 5
        --epochs-per-iter 1 --retrain-epochs 5 --rho-mult 1.778 --parallel 2 --sparsities 0.7,0.9"
    python3 benchmarks/resnet56_cifar10.py $COMMON --methods magnitude-global \\
        --out benchmarks/results/resnet56_cifar10_cuda_6pass_magnitude.json
    python3 benchmarks/resnet56_cifar10.py $COMMON --methods admm-global --rho 0.01 \\
        --out benchmarks/results/resnet56_cifar10_cuda_6pass_rho0.01.json    # likewise 0.03, 0.1

and in a second call, with --workers 2 --sparsities 0.9 --rho 0.03 --methods admm-global,magnitude-global,
--seed 1 and --seed 2 at once under `timeout 270`: only magnitude with seed 2 finished
(resnet56_cifar10_cuda_6pass_seed2.json).

Fifth lease (2026-11-27, one NVIDIA H100 80GB HBM3, same software, commit ae9e17a): the fourth
lease's $COMMON (--workers 1) with --seed 1 and --seed 2, magnitude and ADMM --rho 0.01 for both
seeds at once (8 runs, 6.6 min), then ADMM --rho 0.03 for both (4 runs, 4.5 min):

    for seed in 1 2; do
      python3 benchmarks/resnet56_cifar10.py $COMMON --seed $seed --methods magnitude-global \
          --out benchmarks/results/resnet56_cifar10_cuda_6pass_magnitude_seed$seed.json &
      python3 benchmarks/resnet56_cifar10.py $COMMON --seed $seed --methods admm-global --rho 0.01 \
          --out benchmarks/results/resnet56_cifar10_cuda_6pass_rho0.01_seed$seed.json &
    done; wait    # then likewise --rho 0.03 (_rho0.03_seed$seed.json)

With --parallel N each run is a process of its own (results do not depend on N, up to the GPU's
nondeterminism; wall times do).
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from classify.pipeline import (ADMM_LR_SCHEDULES, METHODS, PruneSettings, TrainSettings,  # noqa: E402
                               evaluate_accuracy, load_weights, make_eval_loader, model_spec, prepare,
                               prune_model)
from classify.resnet56 import resnet56  # noqa: E402
from classify.run_record import file_sha256  # noqa: E402
from engine import atomic_write_json, resolve_device  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "resnet56_cifar10.json"
SHARED = REPO.parent / "shared" / "data"
SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_METHODS = ("admm-global", "magnitude-global")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10")
    parser.add_argument("--weights", type=Path, default=SHARED / "resnet56" / "resnet56-4bfd9763.th")
    parser.add_argument("--train-samples", type=int, default=768, help="images per epoch; 0: the whole train set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=1000, help="sweep test subset; 0: all 10k")
    parser.add_argument("--admm-iters", type=int, default=2)
    parser.add_argument("--epochs-per-iter", type=int, default=1)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--rho-mult", type=float, default=2.0)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--admm-lr", choices=ADMM_LR_SCHEDULES, default="constant",
                        help="ADMM's LR schedule (see classify prune --admm-lr)")
    parser.add_argument("--seed", type=int, default=0, help="seeds each run's shuffles, crops and flips, and the --eval-samples subset (default: 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes per run")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once, each in its own process (one GPU is mostly idle with one ResNet-56)")
    parser.add_argument("--sparsities", type=lambda text: [float(v) for v in text.split(",")], default=SPARSITIES,
                        help="comma-separated removal ratios (default: 0.1,0.3,0.5,0.7,0.9)")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=list(DEFAULT_METHODS),
                        help="comma-separated pruning methods (default: admm-global,magnitude-global)")
    parser.add_argument("--no-control", action="store_true", help="skip the sparsity-0 fine-tuning control")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    return args


def markdown_table(runs: list[dict]) -> str:
    lines = ["| method | target removal | measured removal | dense top-1 | after hard prune | pruned top-1 "
             "| wall time |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['method']} | {100 * run['target_sparsity']:.0f}% | {100 * run['sparsity']:.2f}% "
                     f"| {run['dense_accuracy']:.2f}% | {run['accuracy_after_hard_prune']:.2f}% "
                     f"| {run['pruned_accuracy']:.2f}% | {run['wall_time_s'] / 60:.1f} min |")
    return "\n".join(lines)


def full_test_accuracy(args: argparse.Namespace, datasets: dict) -> dict:
    """Accuracy of the pretrained checkpoint on all 10k JPEG test images."""
    started = time.perf_counter()
    model = load_weights(resnet56(), args.weights)
    settings = TrainSettings(device=args.device)
    loader = make_eval_loader(model_spec("resnet56"), datasets["test"], settings)
    accuracy = evaluate_accuracy(model.to(resolve_device(args.device)), loader, args.device)
    return {"accuracy": accuracy, "images": len(loader.dataset), "seconds": time.perf_counter() - started,
            "weights": str(args.weights), "weights_sha256": file_sha256(args.weights)}


def train_settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(batch_size=args.batch_size, train_samples=args.train_samples or None,
                         eval_samples=args.eval_samples or None, eval_every=0, progress=False,
                         device=args.device, workers=args.workers, seed=args.seed)


def one_run(args: argparse.Namespace, method: str, sparsity: float, datasets: dict | None = None) -> dict:
    """One pruning run from the pretrained weights (loads the data itself when `datasets` is None)."""
    torch.set_num_threads(args.threads)
    if datasets is None:
        _, datasets = prepare("resnet56", args.data)
    prune = PruneSettings(sparsity=sparsity, method=method, admm_iters=args.admm_iters,
                          epochs_per_iter=args.epochs_per_iter, rho=args.rho, rho_mult=args.rho_mult,
                          retrain_epochs=args.retrain_epochs, admm_lr=args.admm_lr)
    result = prune_model("resnet56", load_weights(resnet56(), args.weights), datasets, prune, train_settings(args))
    result["load_average"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    _, datasets = prepare("resnet56", args.data)
    device = resolve_device(args.device)
    machine = (f"GPU {torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores" if device.type == "cuda"
               else f"{os.cpu_count()}-core CPU, no GPU, shared")
    record = {"benchmark": "resnet56_cifar10", "date": datetime.date.today().isoformat(), "machine": machine,
              "torch": torch.__version__, "torch_threads": args.threads,
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "args": {key: str(value) for key, value in vars(args).items()}, "runs": []}
    record["dense_full_test"] = full_test_accuracy(args, datasets)
    print(f"pretrained ResNet-56 on the 10k JPEG test images: {record['dense_full_test']['accuracy']:.2f}%", flush=True)
    atomic_write_json(args.out, record)
    configs = [] if args.no_control else [("magnitude-global", 0.0)]
    configs += [(method, sparsity) for sparsity in args.sparsities for method in args.methods]

    order = {config: index for index, config in enumerate(configs)}

    def finished(result: dict) -> None:
        record["runs"].append(result)
        record["runs"].sort(key=lambda run: order[(run["method"], run["target_sparsity"])])
        record["markdown"] = markdown_table(record["runs"])
        record["total_wall_time_s"] = time.perf_counter() - started
        atomic_write_json(args.out, record)
        print(markdown_table([result]).splitlines()[-1], flush=True)

    if args.parallel <= 1:
        for method, sparsity in configs:
            finished(one_run(args, method, sparsity, datasets))
    else:  # each process loads the data itself; a failed run is recorded and the others go on
        record["failed"] = []
        with ProcessPoolExecutor(args.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(one_run, args, method, sparsity): (method, sparsity) for method, sparsity in configs}
            for future in as_completed(futures):
                try:
                    finished(future.result())
                except Exception as err:  # noqa: BLE001 - any failure of one run: report it, keep the rest
                    method, sparsity = futures[future]
                    record["failed"].append({"method": method, "target_sparsity": sparsity, "error": repr(err)})
                    atomic_write_json(args.out, record)
                    print(f"{method} at {sparsity:.0%} failed: {err!r}", file=sys.stderr, flush=True)
    print(markdown_table(record["runs"]))
    return 1 if record.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
