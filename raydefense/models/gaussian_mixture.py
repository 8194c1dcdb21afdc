"""A Gaussian-mixture classification head (LDAT, Chen et al.; the L-GM loss of Wan et al.).

One learnable mean mu_k per class, identity covariance and a uniform prior, so the log-posterior
up to a constant is ``logits_k = -0.5 * ||f - mu_k||^2``: softmax of these logits is exactly the
Gaussian posterior p(k | f). During training a multiplicative margin m enlarges the true class's
distance, ``d_y * (1 + m)``, which forces the feature to sit well inside its own class (the L-GM
convention). At inference there is no margin: the head outputs plain log-likelihoods, so any
backbone followed by this head is an ordinary "images -> logits" classifier that every evaluation
attack can target, and the distance to the predicted centroid is ``sqrt(-2 * max logit)``.
"""

from __future__ import annotations

import torch
from torch import nn


class GaussianMixtureHead(nn.Module):
    """features (N, D) -> logits (N, K) = -0.5 * squared distance to each class mean."""

    def __init__(self, in_dim: int, num_classes: int, margin: float = 0.0, init_std: float = 1.0):
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.means = nn.Parameter(torch.randn(num_classes, in_dim) * init_std)

    def sq_distances(self, f: torch.Tensor) -> torch.Tensor:
        """||f - mu_k||^2 for every class, (N, K); expanded form is exact enough and fast."""
        d = (f * f).sum(1, keepdim=True) - 2 * f @ self.means.t() + (self.means * self.means).sum(1)[None]
        return d.clamp_min(0)

    def forward(self, f: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood logits; with labels ``y`` in training mode the true class gets the margin."""
        d = self.sq_distances(f)
        if y is not None and self.training and self.margin > 0:
            d = d + self.margin * d * nn.functional.one_hot(y, d.shape[1]).to(d.dtype)
        return -0.5 * d

    def likelihood_loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_lkd = mean 0.5 * ||f - mu_y||^2: pulls features (and means) towards each other."""
        return 0.5 * (f - self.means[y]).pow(2).sum(1).mean()


@torch.no_grad()
def gm_predict(model: nn.Module, x: torch.Tensor, threshold: float = 0.6) -> dict[str, torch.Tensor]:
    """LDAT's outputs: label, distance to its centroid, confidence (max posterior) and the reject
    flag (confidence below ``threshold``). ``model`` is a Classifier with a GaussianMixtureHead."""
    logits = model(x)
    conf, pred = logits.softmax(1).max(1)
    distance = (-2 * logits.gather(1, pred[:, None]).squeeze(1)).clamp_min(0).sqrt()
    return {"pred": pred, "distance": distance, "confidence": conf, "rejected": conf < threshold}
