"""BatchNorm statistics after pruning: recomputed from training images, with dropout passing its
input through, and channels left constant by the pruning given a scale of 0."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch.optim.swa_utils import update_bn


@torch.no_grad()
def recompute_batchnorm_statistics(model: torch.nn.Module, batches: Iterable, device: torch.device) -> int:
    """Replace the BN running statistics of ``model`` (on ``device``) by their average over
    ``batches`` (``torch.optim.swa_utils.update_bn``; a batch may be (images, ...)), with every
    dropout passing its input through and torch's global random stream left as it was (a data
    loader draws from it); then `silence_constant_channels`, whose count it returns."""
    with torch.random.fork_rng(devices=[]), dropout_off(model):
        update_bn(batches, model, device)
    return silence_constant_channels(model)


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module):
    """Within the block, every ``nn.Dropout`` of ``model`` passes its input unchanged (probability 0),
    in training mode too; the probabilities are restored after it."""
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    probabilities = [module.p for module in dropouts]
    for module in dropouts:
        module.p = 0.0
    try:
        yield
    finally:
        for module, probability in zip(dropouts, probabilities):
            module.p = probability


@torch.no_grad()
def silence_constant_channels(model: torch.nn.Module) -> int:
    """Set the BatchNorm scale to 0 in every channel whose running variance is 0 within float32
    rounding of its mean (and below the BN's eps); returns how many. Pruning leaves such channels:
    a convolution whose kept weights all read emptied channels outputs a constant. Normalised, a
    constant is 0 and the BN outputs its bias, but x - mean is then rounding noise multiplied by
    1/sqrt(eps) (316), and in a chain of such channels the noise made outputs that moved by 0.15
    between float32 and float64 and failed the export checks. With the scale 0 the channel
    outputs its bias exactly."""
    rounding = 8 * torch.finfo(torch.float32).eps
    silenced = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats:
            constant = (module.running_var <= (rounding * module.running_mean.abs()) ** 2) \
                & (module.running_var < module.eps)       # a larger spread is a signal, however small
            silenced += int((constant & (module.weight != 0)).sum())
            module.weight[constant] = 0.0
    return silenced
