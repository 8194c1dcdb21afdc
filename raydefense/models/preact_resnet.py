"""PreAct ResNet-18 (He et al. 2016), the usual CIFAR robustness backbone."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        w = width
        layers, planes = [], w
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
            out = w * mult
            layers.append(nn.Sequential(PreActBlock(planes, out, stride), PreActBlock(out, out, 1)))
            planes = out
        self.blocks = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
            *layers,
            nn.Sequential(nn.BatchNorm2d(planes), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        )
        self.out_dim = planes

    def forward(self, x):
        return self.blocks(x)
