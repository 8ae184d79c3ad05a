"""Cost of masked retraining: (a) a masked training step of ResNet-56 against a plain one,
(b) the mask operations alone at ResNet-56 and at YOLOv4 scale, against one multiply per tensor.

(a) ResNet-56 (0.85M conv/linear weights, 70% removed by global magnitude) on random batches of
    CIFAR-sized images, SGD with Nesterov momentum 0.9 and weight decay 1e-4, as `classify` trains
    it. A plain step is zero_grad + forward + backward + ``optimizer.step()``; a masked step adds
    what ``pruning.MaskCallback`` does: ``Masks.mask_grads`` before the step and ``Masks.apply``
    (weights and momentum) after it. Both run interleaved on one model; the ratio of the medians is
    reported.
(b) ``Masks.mask_grads`` + ``Masks.apply`` (weights and momentum buffers) alone, against the same
    three multiplies written as one ``mul_`` per tensor with bool masks (what ``Masks`` did before
    it multiplied each group with one ``torch._foreach_mul_``), on ResNet-56 and on 64.3M weights
    shaped like YOLOv4's 110 convolutions (`admm_cost.yolov4_sized_model`).

Reproduce: ``.venv/bin/python benchmarks/mask_cost.py --threads 1`` (CPU, writes
benchmarks/results/mask_cost.json) or ``python3 benchmarks/mask_cost.py --device cuda --threads 1
--out benchmarks/results/mask_cost_cuda.json``. The machine, date, torch version and load average are in
the JSON. On a GPU every timed block waits for its queued kernels at both ends. Recorded 2026-11-26:
the CPU run on this project's 2-core machine (load ~3, two other jobs beside it), the CUDA run on a
lent NVIDIA H100 80GB HBM3 (16 CPU cores, torch 2.11.0+cu130).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from admm_cost import Clock, yolov4_sized_model  # noqa: E402  (benchmarks/ is the script's folder)
from classify.resnet56 import resnet56  # noqa: E402
from engine import atomic_write_json, resolve_device  # noqa: E402
from pruning import Masks, magnitude_prune  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "mask_cost.json"


@torch.no_grad()
def per_tensor_masking(masks: Masks, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Reference: gradients, weights and momentum masked by one ``mul_`` per tensor."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params[name]
        if param.grad is not None:
            param.grad.mul_(mask)
        param.mul_(mask)
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(mask)


def masking(masks: Masks, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What `pruning.MaskCallback` does around one step."""
    masks.mask_grads(model)
    masks.apply(model, optimizer)


def ops_cost(model: nn.Module, repeats: int, device: torch.device) -> dict:
    """Median seconds of the mask operations on `model` (gradients and momentum filled in), interleaved
    with the per-tensor reference."""
    masks = magnitude_prune(model, 0.7, scope="global").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    current, reference = Clock(device), Clock(device)
    masking(masks, model, optimizer), per_tensor_masking(masks, model, optimizer)   # warm-up
    for index in range(repeats):
        order = (masking, per_tensor_masking) if index % 2 == 0 else (per_tensor_masking, masking)
        for operation in order:
            with current if operation is masking else reference:
                operation(masks, model, optimizer)
    return {"masked_tensors": len(masks), "masked_weights": masks.stats()["params"], "repeats": repeats,
            **current.medians("foreach"), **reference.medians("per_tensor"),
            "per_tensor_over_foreach": statistics.median(reference.wall) / statistics.median(current.wall)}


def step_cost(repeats: int, batch_size: int, device: torch.device) -> dict:
    """Median seconds of a plain and a masked ResNet-56 training step, interleaved on one model."""
    torch.manual_seed(0)
    model = resnet56().to(device)
    masks = magnitude_prune(model, 0.7, scope="global").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    plain, masked, warmup = Clock(device), Clock(device), Clock(device)

    def one_step(use_masks: bool, clock: Clock) -> None:
        with clock:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            if use_masks:
                masks.mask_grads(model)
            optimizer.step()
            if use_masks:
                masks.apply(model, optimizer)

    for _ in range(3):
        one_step(False, warmup), one_step(True, warmup)
    for index in range(repeats):
        for use_masks in ((False, True) if index % 2 == 0 else (True, False)):
            one_step(use_masks, masked if use_masks else plain)
    return {"model": "resnet56, 70% removed (global magnitude), SGD Nesterov momentum",
            "batch": [batch_size, 3, 32, 32], "repeats": repeats,
            **plain.medians("plain_step"), **masked.medians("masked_step"),
            "ratio_of_wall_medians": statistics.median(masked.wall) / statistics.median(plain.wall)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ops-repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then also write --out elsewhere)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "no GPU"
    result = {
        "benchmark": "mask_cost", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {gpu}",
        "device": str(device), "torch": torch.__version__, "torch_threads": args.threads,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_at_start": list(os.getloadavg()),
        "step": step_cost(args.step_repeats, args.batch_size, device),
        "ops_resnet56": ops_cost(resnet56().to(device), args.ops_repeats, device),
        "ops_yolov4_sized": ops_cost(yolov4_sized_model(device), max(3, args.ops_repeats // 3), device),
        "load_average_at_end": list(os.getloadavg()),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
