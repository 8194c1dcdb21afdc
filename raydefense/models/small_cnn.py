"""A small CNN for 8x8 (digits) and 28x28 (MNIST-like) inputs, without BatchNorm.

Downsampling is done by strided convolutions: on 8x8 inputs pooling layers cost more CPU time
than the convolutions themselves (measured with torch.profiler). No BatchNorm keeps train and eval
mode identical, so the adversarial examples crafted in eval mode are exactly the ones the training
step sees, and lets several models be vmapped together.
"""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 16, feature_dim: int = 128, image_size: int = 8):
        super().__init__()
        w = width
        spatial = (image_size + 1) // 2
        spatial = (spatial + 1) // 2  # after two stride-2 convolutions
        pool = nn.Identity() if spatial <= 2 else nn.AdaptiveAvgPool2d(2)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(), pool),
            nn.Sequential(nn.Flatten(), nn.Linear(4 * w * min(spatial, 2) ** 2, feature_dim), nn.ReLU()),
        )
        self.out_dim = feature_dim
        for m in self.modules():  # He init: without BatchNorm, PyTorch's default init starts on a long plateau
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.blocks(x)
