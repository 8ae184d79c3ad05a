"""ResNet-56 for CIFAR-10 (He et al. 2016, section 4.2) with option-A shortcuts.

Three stages of 9 basic blocks (16, 32, 64 channels; stride 2 at the start of stages 2 and 3),
a 3x3 stem, global average pooling and a 64->10 linear layer: 0.85M parameters. Option A: where
a block halves the resolution and doubles the channels, the shortcut subsamples by 2 and pads the
new channels with zeros (no parameters). The layout and parameter names match the pretrained
checkpoint of akamaster/pytorch_resnet_cifar10 (`resnet56-4bfd9763.th`, keys prefixed `module.`;
load it with `classify.pipeline.load_weights`), which expects inputs normalised with the ImageNet
mean/std below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESNET56_MEAN = (0.485, 0.456, 0.406)
RESNET56_STD = (0.229, 0.224, 0.225)
BLOCKS_PER_STAGE = 9


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2] with `extra` zero channels on each side.

    Forward: Tensor[B, C, H, W] -> Tensor[B, C + 2 * extra, H / 2, W / 2].
    """

    def __init__(self, extra_channels_per_side: int):
        super().__init__()
        self.extra = extra_channels_per_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra, self.extra))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ZeroPadShortcut((planes - in_planes) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 RGB images.

    Args:
        blocks_per_stage: n (9 for ResNet-56).
        num_classes: outputs of the linear layer.

    Forward: float Tensor[B, 3, 32, 32] (normalised) -> logits Tensor[B, num_classes].
    """

    def __init__(self, blocks_per_stage: int = BLOCKS_PER_STAGE, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))   # [B, 16, 32, 32]
        out = self.layer3(self.layer2(self.layer1(out)))  # [B, 64, 8, 8]
        return self.linear(out.mean(dim=(2, 3)))


def resnet56(num_classes: int = 10) -> CifarResNet:
    """A randomly initialised ResNet-56."""
    return CifarResNet(BLOCKS_PER_STAGE, num_classes)

