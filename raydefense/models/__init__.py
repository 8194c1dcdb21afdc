"""Backbones and the classifier wrapper every exported model uses.

A backbone is an ``nn.Module`` with ``blocks`` (an ``nn.Sequential`` of stages, so methods such as
RFD can split it) and ``out_dim``. ``Classifier`` = Normalize -> backbone -> head; it maps images
in [0, 1] to logits and exposes ``features(x)`` (the penultimate representation).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from raydefense.data import DatasetInfo
from raydefense.errors import UserError
from raydefense.models.normalize import Normalize
from raydefense.models.preact_resnet import PreActResNet18
from raydefense.models.small_cnn import SmallCNN
from raydefense.models.wide_resnet import WideResNet

BACKBONES: dict[str, Callable[[DatasetInfo], nn.Module]] = {
    # 8x8 digits need little capacity; width 16 halves the CPU time of width 32 (benchmarks/)
    "small-cnn": lambda i: SmallCNN(i.shape[0], 16 if i.shape[1] <= 8 else 32, 128, i.shape[1]),
    "preact-resnet18": lambda i: PreActResNet18(i.shape[0]),
    "wrn-28-10": lambda i: WideResNet(28, 10, i.shape[0]),
    "wrn-34-10": lambda i: WideResNet(34, 10, i.shape[0]),
}
ARCHS = tuple(BACKBONES)


def default_arch(info: DatasetInfo) -> str:
    """Small CNN for 8x8 and 28x28 images, PreAct ResNet-18 for colour images."""
    return "small-cnn" if info.shape[1] <= 28 else "preact-resnet18"


def build_backbone(arch: str, info: DatasetInfo) -> nn.Module:
    if arch not in BACKBONES:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return BACKBONES[arch](info)


class Classifier(nn.Module):
    """Normalize -> backbone -> head. Input: images in [0, 1], NCHW. Output: logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, info: DatasetInfo):
        super().__init__()
        self.normalize = Normalize(info.mean, info.std)
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(arch: str, info: DatasetInfo, head: nn.Module | None = None) -> Classifier:
    """A backbone with a linear head (or the given head) and normalization inside."""
    backbone = build_backbone(arch, info)
    return Classifier(backbone, head if head is not None else nn.Linear(backbone.out_dim, info.num_classes), info)
