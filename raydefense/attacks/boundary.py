"""LDAT's training attack (Chen et al., Algorithm 1): an L2 walk whose radius follows the boundary.

Each sample has its own radius eps (start ``eps_init``, paper 1 on CIFAR-10). At every step the
radius shrinks by (1 - gamma) if x + delta is already misclassified and grows by (1 + gamma)
otherwise; the direction is the previous delta plus the unit cross-entropy gradient, rescaled to
the radius. So the examples settle near the decision boundary instead of far past it. Following
the paper, nothing is clipped during the walk (the search range is wider than PGD's); the final
delta is projected once onto the L2 budget and the [0, 1] box.

Input gradients only (``torch.autograd.grad``); the model is put in eval mode for the walk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks.pgd import _l2_norm, eval_mode, project


def boundary_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, steps: int = 10,
                    gamma: float = 0.2, eps_init: float = 1.0,
                    return_radius: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, batched with a per-sample radius. Returns x_adv (detached, inside the L2
    ``budget`` ball and [0, 1]) and, with ``return_radius``, each sample's final radius eps_K."""
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    x = x.detach()
    shape = (-1,) + (1,) * (x.dim() - 1)
    eps = torch.full((len(x),), float(eps_init), device=x.device, dtype=x.dtype)
    delta = torch.zeros_like(x)
    with eval_mode(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            loss = F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                fooled = logits.argmax(1) != y
                eps = torch.where(fooled, eps * (1 - gamma), eps * (1 + gamma))
                eta = delta + grad / _l2_norm(grad)
                delta = eps.view(shape) * eta / _l2_norm(eta)
    delta = project(delta.detach(), x, budget, "l2") if budget > 0 else torch.zeros_like(x)
    x_adv = (x + delta).detach()
    return (x_adv, eps) if return_radius else x_adv
