"""Knowledge distillation from the dense model into the model being pruned (Hinton et al. 2015).

`DistillationLoss(teacher, weight, temperature)` is a loss for `engine.Trainer`:

    (1 - weight) * cross_entropy(student, labels)
        + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the soft term's gradient on the scale of the hard one. `frozen_copy(model)` makes the
teacher: a copy in eval mode (BatchNorm on its running statistics) that takes no gradients.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def top1_percent(logits: Tensor, labels: Tensor) -> float:
    """Share of rows of logits Tensor[B, K] whose argmax is the label, in percent."""
    return 100.0 * float((logits.detach().argmax(1) == labels).float().mean())


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with `requires_grad` off: the teacher."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class DistillationLoss:
    """Cross-entropy on the labels blended with the teacher's softened outputs (see module doc)."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], found {weight}")
        if not temperature > 0.0:
            raise ValueError(f"distillation temperature must be > 0, found {temperature}")
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict]:
        images, labels = batch
        logits = model(images)
        with torch.no_grad():
            soft_targets = F.softmax(self.teacher(images).float() / self.temperature, dim=1)
        hard = F.cross_entropy(logits, labels)
        soft = F.kl_div(F.log_softmax(logits.float() / self.temperature, dim=1), soft_targets,
                        reduction="batchmean") * self.temperature ** 2
        loss = (1.0 - self.weight) * hard + self.weight * soft
        return loss, {"acc": top1_percent(logits, labels)}
