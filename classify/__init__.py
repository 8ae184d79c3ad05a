"""Classifiers for the paper's experiments: LeNet-5 (MNIST), ResNet-56 (CIFAR-10), and their workflows."""
from classify.lenet5 import LENET5_PRUNABLE_WEIGHTS, LeNet5
from classify.pipeline import (METHODS, MODELS, PruneSettings, TrainSettings, evaluate_accuracy, load_weights,
                               prepare, prune_model, train_model)
from classify.resnet56 import CifarResNet, resnet56

__all__ = [
    "CifarResNet",
    "LENET5_PRUNABLE_WEIGHTS",
    "LeNet5",
    "METHODS",
    "MODELS",
    "PruneSettings",
    "TrainSettings",
    "evaluate_accuracy",
    "load_weights",
    "prepare",
    "prune_model",
    "resnet56",
    "train_model",
]
