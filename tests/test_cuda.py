"""CUDA paths, run where a GPU is present (CI's CPU machines skip this file).

What only a GPU shows: the projection computed by CUDA kernels, float16 autocast with a GradScaler
around the ADMM penalty and the masks, checkpoints moving from GPU to CPU, and the detector
pipeline training on the GPU.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pruning
from data.synthetic import make_shapes_dataset
from detector import batchnorm, predict, prune_pipeline
from detector.prune_job import PruneJob
from detector.prune_pipeline import run_job
from engine import TrainConfig, Trainer
from pruning import ADMM, ADMMCallback, ADMMConfig, MaskCallback, global_topk_masks, kept_count, layerwise_topk_masks

from helpers import small_convnet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
DEMO_CFG = str(Path(prune_pipeline.__file__).parent / "cfgs" / "demo-tiny.cfg")


def random_loader(samples: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(samples, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 5, (samples,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def cross_entropy(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    images, labels = batch
    return F.cross_entropy(model(images), labels), {}


def tied_tensors() -> list[torch.Tensor]:
    """Three weight-shaped tensors holding only 41 distinct values: ties at every threshold."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(-20, 21, shape, generator=generator).float() / 4
            for shape in ((64, 32, 3, 3), (128, 64, 1, 1), (10, 128))]


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_projection_on_cuda_keeps_exactly_k_and_equals_cpu(sparsity):
    tensors = tied_tensors()
    k = kept_count(sum(t.numel() for t in tensors), sparsity)
    on_cpu = global_topk_masks(tensors, k)
    on_cuda = global_topk_masks([t.to(CUDA) for t in tensors], k)
    assert all(mask.is_cuda for mask in on_cuda)
    assert sum(int(mask.sum()) for mask in on_cuda) == k
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_cuda))
    half = global_topk_masks([t.to(CUDA, torch.float16) for t in tensors], k)  # /4 steps are exact in fp16
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, half))
    ratios = [sparsity, 0.5, 0.0]
    layerwise_cpu = layerwise_topk_masks(tensors, ratios)
    layerwise_cuda = layerwise_topk_masks([t.to(CUDA) for t in tensors], ratios)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(layerwise_cpu, layerwise_cuda))


def test_admm_penalty_reaches_the_optimizer_unscaled_under_amp():
    """Zero loss, SGD lr 1 without momentum: one step must move W by exactly -rho (W - Z + U).
    Added to the still-scaled gradients, the penalty would shrink by the GradScaler's scale."""
    torch.manual_seed(0)
    model = small_convnet().to(CUDA)
    rho = 0.1
    admm = ADMM(model, ADMMConfig(sparsity=0.8, rho=rho))
    admm.update()  # Z from the first projection, U = W - Z (nonzero at pruned positions)
    expected = [w.detach() - rho * (w.detach() - z + u) for w, z, u in zip(admm.params, admm.Z, admm.U)]
    assert any(torch.count_nonzero(u) > 0 for u in admm.U)

    def zero_loss(module: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        images, _ = batch
        return module(images).sum() * 0.0, {}

    config = TrainConfig(epochs=1, device="cuda", amp=True, progress=False, eval_every=0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), zero_loss,
                      random_loader(samples=16), config, callbacks=[ADMMCallback(admm, steps_per_update=1000)])
    trainer.fit()
    assert trainer.use_amp and trainer.scaler.get_scale() > 1.0  # the GradScaler really was scaling
    for weight, wanted in zip(admm.params, expected):
        torch.testing.assert_close(weight.detach(), wanted, rtol=1e-5, atol=1e-6)


def test_masked_amp_training_with_ema_on_cuda_then_resumed_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = small_convnet()
    masks = pruning.magnitude_prune(model, 0.7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    config = TrainConfig(epochs=2, device="cuda", amp=True, ema=True, ema_decay=0.9, ema_tau=1.0,
                         checkpoint_dir=tmp_path / "ckpt", progress=False, eval_every=0)
    trainer = Trainer(model, optimizer, cross_entropy, random_loader(), config, callbacks=[MaskCallback(masks)])
    trainer.fit()
    assert trainer.use_amp and trainer.step == 8
    params, averaged = dict(model.named_parameters()), dict(trainer.ema.module.named_parameters())
    for name, mask in masks.items():
        mask = mask.to(CUDA)
        weight = params[name].detach()
        assert weight.is_cuda and torch.count_nonzero(weight[~mask]) == 0, name
        assert torch.count_nonzero(averaged[name].detach()[~mask]) == 0, f"{name}: EMA copy revived"
        assert torch.count_nonzero(optimizer.state[params[name]]["momentum_buffer"][~mask]) == 0, name
        assert torch.count_nonzero(weight[mask]) == int(mask.sum()), f"{name}: kept weights were zeroed"

    # The GPU run's checkpoint continues on the CPU: its masks replace the fresh model's own.
    cpu_model = small_convnet()
    cpu_masks = pruning.magnitude_prune(cpu_model, 0.7)
    cpu_optimizer = torch.optim.SGD(cpu_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    resumed = Trainer(cpu_model, cpu_optimizer, cross_entropy, random_loader(),
                      TrainConfig(epochs=3, device="cpu", amp=True, ema=True, ema_decay=0.9, ema_tau=1.0,
                                  resume=tmp_path / "ckpt", progress=False, eval_every=0),
                      callbacks=[MaskCallback(cpu_masks)])
    resumed.fit()
    assert resumed.step == 12 and not resumed.use_amp
    cpu_params = dict(cpu_model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(cpu_masks[name].cpu(), mask.cpu()), f"{name}: resumed masks differ"
        assert torch.count_nonzero(cpu_params[name].detach()[~mask.cpu()]) == 0, name


def spy_on_evaluation_and_recalibration_devices(monkeypatch) -> set[str]:
    """The device types the pipeline's evaluations and BatchNorm recalibrations run on."""
    devices: set[str] = set()
    real_postprocess, real_update_bn = predict.postprocess, batchnorm.update_bn

    def postprocess(outputs, *args):
        devices.add(f"eval:{outputs[0].device.type}")
        return real_postprocess(outputs, *args)

    def update_bn(loader, model, device):
        devices.add(f"bn:{next(model.parameters()).device.type}")
        return real_update_bn(loader, model, device)

    monkeypatch.setattr(predict, "postprocess", postprocess)
    monkeypatch.setattr(batchnorm, "update_bn", update_bn)
    return devices


@pytest.mark.parametrize("method", ["admm-global", "magnitude-global"])
def test_detect_prune_pipeline_on_cuda_with_amp(tmp_path, monkeypatch, method):
    make_shapes_dataset(tmp_path / "shapes", n_train=12, n_val=6, img_size=96, seed=3)
    out = tmp_path / "run"
    job = PruneJob(cfg=DEMO_CFG, data=str(tmp_path / "shapes" / "data.yaml"), out=str(out), sparsity=[0.6],
                   method=method, img_size=96, batch_size=4, admm_iters=2, epochs_per_iter=1, retrain_epochs=2,
                   rho=1e-2, lr=1e-3, export=["compact"], latency_runs=1, progress=False, device="cuda", amp=True,
                   bn_images=8, seed=0)
    devices = spy_on_evaluation_and_recalibration_devices(monkeypatch)
    results = run_job(job)
    assert devices == {"eval:cuda", "bn:cuda"}      # every stage's mAP and statistics, not the CPU's
    stages = results["sweep"][0]["stages"]
    assert [record["stage"] for record in stages] == ["dense", "hard_prune", "retrained"]
    for record in stages:
        assert 0.0 <= record["map50"] <= 1.0 and 0.0 <= record["map50_95"] <= record["map50"]
    state = torch.load(out / "sparsity_0.6" / "retrained.pt", weights_only=True)
    kept = sum(int(mask.sum()) for mask in state["masks"].values())
    assert kept == kept_count(sum(mask.numel() for mask in state["masks"].values()), 0.6)
    for name, mask in state["masks"].items():
        assert torch.count_nonzero(state["model"][name][~mask]) == 0, f"{name}: pruned weight came back"


def test_admm_built_on_the_cpu_follows_the_model_to_the_gpu():
    """A loop may move the model after the ADMM callback was made (the trainer does, in __init__)."""
    torch.manual_seed(0)
    model = small_convnet()
    admm = ADMM(model, ADMMConfig(sparsity=0.8, rho=1e-2))
    callback = ADMMCallback(admm, steps_per_update=2)
    config = TrainConfig(epochs=1, device="cuda", amp=True, progress=False, eval_every=0)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), cross_entropy, random_loader(), config,
            callbacks=[callback]).fit()
    assert len(callback.history) == 2
    assert all(tensor.is_cuda for state in (admm.Z, admm.U, admm.support) for tensor in state)
    masks = admm.hard_prune()
    assert sum(int(mask.sum()) for _, mask in masks.items()) == admm.k
