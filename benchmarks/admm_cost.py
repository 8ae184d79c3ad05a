"""Cost of ADMM pruning: (a) one ADMM training step against a plain one, (b) one Z-step at YOLOv4 scale.

(a) A small ResNet-like conv net (stem 3->32, three stages of two 3x3 basic blocks at 32/64/128
    channels, BN, ReLU, global pooling, Linear; 0.69M conv/linear weights) on batches of 16
    RGB 64x64 images, SGD with momentum. A plain step is forward + backward + ``optimizer.step()``;
    an ADMM step adds ``admm.add_penalty_grad()`` before the step. Both run on the same model in
    the same process, interleaved (plain, ADMM, ADMM, plain, ...), and the ratio of the medians is
    reported. Goal: <= 1.05x.
(b) ``ADMM.update()`` (projection of W + U onto the global top-k set, U-step, residuals) on
    64.3M random-normal weights split exactly like YOLOv4's 110 convolutions (shapes from
    Darknet's yolov4.cfg), 80% sparsity. Goal: < 1 s. For reference, the same threshold found by
    ``torch.kthvalue`` over one flat concatenation of the magnitudes.

Reproduce: ``.venv/bin/python benchmarks/admm_cost.py --threads 1`` (writes
benchmarks/results/admm_cost.json). Measured on a 2-core CPU, no GPU, torch 2.14.1, 2026-11-27,
with other sessions' jobs on the machine (load average ~2.8, recorded in the JSON); process CPU
times are recorded beside wall times, since a loaded machine inflates the latter (an earlier run
at load 8-10 took 1.35 s wall for the Z-step, 0.57 s CPU).

On a GPU (timers wait for the queued kernels): ``python3 benchmarks/admm_cost.py --device cuda
--threads 1 --out benchmarks/results/admm_cost_cuda.json``; recorded 2026-11-26 on an NVIDIA H200
(16 CPU cores, torch 2.11.0+cu130). There the ``*_cpu_*`` fields include the host's wait for the GPU
and mean little; read the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pruning import ADMM, ADMMConfig, global_topk_masks, kept_count
from engine import atomic_write_json, resolve_device

RESULTS = Path(__file__).resolve().parent / "results" / "admm_cost.json"

# (out_channels, in_channels, kernel) of the 110 [convolutional] sections of Darknet's yolov4.cfg, in order.
YOLOV4_CONV_SHAPES = [
    (32, 3, 3), (64, 32, 3), (64, 64, 1), (64, 64, 1), (32, 64, 1), (64, 32, 3), (64, 64, 1), (64, 128, 1),
    (128, 64, 3), (64, 128, 1), (64, 128, 1), (64, 64, 1), (64, 64, 3), (64, 64, 1), (64, 64, 3), (64, 64, 1),
    (128, 128, 1), (256, 128, 3), (128, 256, 1), (128, 256, 1), *[(128, 128, 1), (128, 128, 3)] * 8,
    (128, 128, 1), (256, 256, 1), (512, 256, 3), (256, 512, 1), (256, 512, 1), *[(256, 256, 1), (256, 256, 3)] * 8,
    (256, 256, 1), (512, 512, 1), (1024, 512, 3), (512, 1024, 1), (512, 1024, 1), *[(512, 512, 1), (512, 512, 3)] * 4,
    (512, 512, 1), (1024, 1024, 1), (512, 1024, 1), (1024, 512, 3), (512, 1024, 1), (512, 2048, 1), (1024, 512, 3),
    (512, 1024, 1), (256, 512, 1), (256, 512, 1), (256, 512, 1), (512, 256, 3), (256, 512, 1), (512, 256, 3),
    (256, 512, 1), (128, 256, 1), (128, 256, 1), (128, 256, 1), (256, 128, 3), (128, 256, 1), (256, 128, 3),
    (128, 256, 1), (256, 128, 3), (255, 256, 1), (256, 128, 3), (256, 512, 1), (512, 256, 3), (256, 512, 1),
    (512, 256, 3), (256, 512, 1), (512, 256, 3), (255, 512, 1), (512, 256, 3), (512, 1024, 1), (1024, 512, 3),
    (512, 1024, 1), (1024, 512, 3), (512, 1024, 1), (1024, 512, 3), (255, 1024, 1),
]


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(num_classes: int = 10) -> nn.Module:
    layers = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    channels = 32
    for width, stride in [(32, 1), (64, 2), (128, 2)]:
        layers += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class Clock:
    """Wall (``perf_counter``) and process CPU (``process_time``) seconds of timed blocks; on a GPU
    the block's queued kernels are waited for at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)

    def medians(self, prefix: str) -> dict:
        return {f"{prefix}_wall_median_s": statistics.median(self.wall),
                f"{prefix}_cpu_median_s": statistics.median(self.cpu)}


def step_cost(repeats: int, batch_size: int, device: torch.device) -> dict:
    """Median seconds of a plain and an ADMM training step, interleaved on one model."""
    torch.manual_seed(0)
    model = small_resnet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    admm = ADMM(model, ADMMConfig(sparsity=0.8, rho=1e-3))
    images = torch.randn(batch_size, 3, 64, 64).to(device)
    labels = torch.randint(0, 10, (batch_size,)).to(device)
    plain, with_admm, penalty_only, warmup = (Clock(device) for _ in range(4))

    def one_step(use_admm: bool, clock: Clock) -> None:
        with clock:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            if use_admm:
                admm.add_penalty_grad()
            optimizer.step()

    for _ in range(2):
        one_step(False, warmup), one_step(True, warmup)
    for index in range(repeats):
        order = (False, True) if index % 2 == 0 else (True, False)
        for use_admm in order:
            one_step(use_admm, with_admm if use_admm else plain)
    for _ in range(repeats):
        with penalty_only:
            admm.add_penalty_grad()
    return {
        "model": "small ResNet-like conv net (3 stages x 2 basic blocks, 32/64/128 ch), SGD momentum",
        "batch": [batch_size, 3, 64, 64],
        "prunable_weights": sum(p.numel() for p in admm.params),
        "repeats": repeats,
        **plain.medians("plain_step"),
        **with_admm.medians("admm_step"),
        "ratio_of_wall_medians": statistics.median(with_admm.wall) / statistics.median(plain.wall),
        "ratio_of_cpu_medians": statistics.median(with_admm.cpu) / statistics.median(plain.cpu),
        **penalty_only.medians("add_penalty_grad"),
    }


def yolov4_sized_model(device: torch.device) -> nn.Module:
    """110 bias-free convolutions with YOLOv4's shapes and N(0, 0.05) weights (64.3M weights)."""
    generator = torch.Generator().manual_seed(0)
    convs = nn.ModuleList(nn.Conv2d(c_in, c_out, k, bias=False, device="meta") for c_out, c_in, k in YOLOV4_CONV_SHAPES)
    convs.to_empty(device="cpu")
    with torch.no_grad():
        for conv in convs:
            conv.weight.normal_(0.0, 0.05, generator=generator)
    return convs.to(device)


def zstep_cost(repeats: int, device: torch.device) -> dict:
    """Median seconds of ``ADMM.update()`` and of the bare projection at YOLOv4 scale."""
    model = yolov4_sized_model(device)
    admm = ADMM(model, ADMMConfig(sparsity=0.8, rho=1e-3, rho_multiplier=1.1, rho_max=1.0))
    generator = torch.Generator().manual_seed(1)
    update, projection, flat_kthvalue = Clock(device), Clock(device), Clock(device)
    for _ in range(repeats):
        with torch.no_grad():                                  # a W-step's worth of change
            for param in admm.params:
                param.add_(torch.randn(param.shape, generator=generator).to(device), alpha=1e-3)
        with update:
            admm.update()
        with projection:
            masks = global_topk_masks(admm.params, admm.k)
    kept = sum(int(mask.sum()) for mask in masks)
    for _ in range(2):
        with flat_kthvalue:
            flat = torch.cat([param.detach().reshape(-1).abs() for param in admm.params])
            torch.kthvalue(flat, flat.numel() - admm.k + 1)
    total = sum(p.numel() for p in admm.params)
    return {
        "weights": total,
        "tensors": len(admm.params),
        "sparsity": 0.8,
        "k": admm.k,
        "kept_exactly_k": kept == admm.k == kept_count(total, 0.8),
        "repeats": repeats,
        **update.medians("update"),
        "update_wall_all_s": update.wall,
        **projection.medians("projection"),
        **flat_kthvalue.medians("reference_flat_kthvalue"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--zstep-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch.set_num_threads values to measure with, one run each")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then also write --out elsewhere)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gpu = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "no GPU"
    result = {
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {gpu}",
        "device": str(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": [],
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        run = {"threads": threads, "load_average_at_start": list(os.getloadavg())}
        run["step"] = step_cost(args.step_repeats, args.batch_size, device)
        run["zstep"] = zstep_cost(args.zstep_repeats, device)
        run["load_average_at_end"] = list(os.getloadavg())
        result["runs"].append(run)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
