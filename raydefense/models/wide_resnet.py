"""WideResNet-depth-k (Zagoruyko & Komodakis 2016): WRN-28-10 and WRN-34-10 of the papers.

Its residual unit is the pre-activation block of PreAct ResNet (same layers, same state-dict keys)."""

from __future__ import annotations

from torch import nn

from raydefense.models.preact_resnet import PreActBlock


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        groups, planes = [], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [PreActBlock(planes if i == 0 else width, width, stride if i == 0 else 1) for i in range(n)]
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
