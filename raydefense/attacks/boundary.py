"""LDAT's training attack (Chen et al., Algorithm 1): an L2 walk whose radius follows the boundary.

Each sample has its own radius eps (start ``eps_init``, paper 1 on CIFAR-10). At every step the
radius shrinks by (1 - gamma) if x + delta is already misclassified and grows by (1 + gamma)
otherwise; the direction is the previous delta plus the unit cross-entropy gradient, rescaled to
the radius. So the examples settle near the decision boundary instead of far past it. Following
the paper, nothing is clipped during the walk (the search range is wider than PGD's); the final
delta is projected once onto the L2 budget and the [0, 1] box.

Input gradients only (``torch.autograd.grad``); the model is put in eval mode for the walk.

Saturation: where the CE input gradient underflows to zero (float32 softmax of a very confident
sample, e.g. a Gaussian-mixture head with a logit gap above ~90) g/||g|| is 0 and the walk would
never leave x (delta = 0). There the direction is taken from the logit margin (max wrong logit -
true logit), whose gradient does not saturate, and, where that is zero too (a constant model), from
a random unit direction. ``return_stats`` reports how often each fallback was used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks.pgd import _l2_norm, eval_mode, project


ZERO_GRAD = 1e-12  # below this L2 norm a gradient cannot be normalised (``_l2_norm``'s clamp)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample max wrong logit - true logit (summed): a loss without softmax, so no underflow."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return (wrong - true).sum()


def _directions(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None, stats: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, unit direction): the CE gradient, the margin gradient where CE's is zero, a random
    direction where both are."""
    delta = delta.detach().requires_grad_(True)
    logits = model(x + delta)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), delta, retain_graph=True)
    flat = lambda t: t.flatten(1).norm(dim=1)  # noqa: E731
    dead = flat(grad) < ZERO_GRAD
    if dead.any():
        (g_margin,) = torch.autograd.grad(_margin(logits, y), delta)
        grad = torch.where(dead.view(-1, *[1] * (x.dim() - 1)), g_margin, grad)
        still = flat(grad) < ZERO_GRAD
        if still.any():
            noise = torch.randn(x.shape, generator=generator, device="cpu").to(x)
            grad = torch.where(still.view(-1, *[1] * (x.dim() - 1)), noise, grad)
        stats["margin_fallback"] += float((dead & ~still).sum())
        stats["random_fallback"] += float(still.sum())
    return logits.detach(), grad / _l2_norm(grad)


def boundary_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: float, steps: int = 10,
                    gamma: float = 0.2, eps_init: float = 1.0, return_radius: bool = False,
                    generator: torch.Generator | None = None, return_stats: bool = False):
    """Algorithm 1, batched with a per-sample radius. Returns x_adv (detached, inside the L2
    ``budget`` ball and [0, 1]), then with ``return_radius`` each sample's final radius eps_K, then
    with ``return_stats`` a dict: the share of (sample, step) directions taken from the margin or
    at random (module docstring) and the share of samples whose final delta is exactly 0."""
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    x = x.detach()
    shape = (-1,) + (1,) * (x.dim() - 1)
    eps = torch.full((len(x),), float(eps_init), device=x.device, dtype=x.dtype)
    delta = torch.zeros_like(x)
    stats = {"margin_fallback": 0.0, "random_fallback": 0.0}
    with eval_mode(model):
        for _ in range(steps):
            logits, unit = _directions(model, x, delta, y, generator, stats)
            with torch.no_grad():
                fooled = logits.argmax(1) != y
                eps = torch.where(fooled, eps * (1 - gamma), eps * (1 + gamma))
                eta = delta + unit
                delta = eps.view(shape) * eta / _l2_norm(eta)
    delta = project(delta.detach(), x, budget, "l2") if budget > 0 else torch.zeros_like(x)
    x_adv = (x + delta).detach()
    total = max(1, len(x) * steps)
    stats = {k: v / total for k, v in stats.items()}
    stats["zero_delta"] = float((delta.flatten(1).norm(dim=1) == 0).float().mean()) if len(x) else 0.0
    out = (x_adv,) + ((eps,) if return_radius else ()) + ((stats,) if return_stats else ())
    return out if len(out) > 1 else x_adv
