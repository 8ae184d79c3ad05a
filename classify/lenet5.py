"""LeNet-5 as pruned by Han et al. 2015 and ADMM (Zhang et al. 2018): Caffe's MNIST "lenet".

conv 20@5x5 -> max-pool 2 -> conv 50@5x5 -> max-pool 2 -> fc 800->500 -> ReLU -> fc 500->10.
There is no activation after the convolutions (as in Caffe's lenet_train_test.prototxt). The conv
and fc weights hold exactly 430,500 values (500 + 25,000 + 400,000 + 5,000); biases add 580.
"""
from __future__ import annotations

import torch
from torch import nn

LENET5_PRUNABLE_WEIGHTS = 430_500


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 single-channel images.

    Args:
        num_classes: outputs of the last layer.

    Forward: float Tensor[B, 1, 28, 28] -> logits Tensor[B, num_classes].
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))            # [B, 20, 12, 12]
        x = self.pool(self.conv2(x))            # [B, 50, 4, 4]
        x = torch.relu(self.fc1(x.flatten(1)))  # [B, 500]
        return self.fc2(x)
