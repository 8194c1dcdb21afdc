"""WideResNet-depth-k (Zagoruyko & Komodakis 2016): WRN-28-10 and WRN-34-10 of the papers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class WideBlock(nn.Module):
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
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        groups, planes = [], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [WideBlock(planes if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            planes = width
        self.blocks = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            *groups,
            nn.Sequential(nn.BatchNorm2d(planes), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        )
        self.out_dim = planes

    def forward(self, x):
        return self.blocks(x)
