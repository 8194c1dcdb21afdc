"""Training-time attacks: FGSM and PGD under L-inf or L2, written for speed.

One engine, ``pgd``, maximizes any objective ``loss_fn(x_adv) -> scalar``, so cross-entropy
attacks, TRADES' KL attack, the logit-distance attack behind AFS's Delta_z and attacks through a
whole stack all share the same projection code. Gradients are taken with respect to the input
only (``torch.autograd.grad``), so no weight gradients are computed or accumulated. Callers put
models in eval mode with ``eval_mode`` (the attack itself never changes a model's mode).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks.shards import sharded

Norm = Literal["linf", "l2"]
Objective = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode and restore each one's previous mode afterwards, even on error."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, was_training in zip(models, modes):
            m.train(was_training)


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project delta onto the eps-ball and keep x + delta inside [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp_(0, 1) - x


def random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform start in the L-inf cube, or uniform in the L2 ball (direction x radius)."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        n = x[0].numel()
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        delta = d / _l2_norm(d) * eps * r.pow(1.0 / n)
    return project(delta, x, eps, norm)


def pgd(loss_fn: Objective, x: torch.Tensor, eps: float, steps: int, step_size: float | None = None,
        norm: Norm = "linf", rand_init: bool = True, generator: torch.Generator | None = None,
        x_init: torch.Tensor | None = None) -> torch.Tensor:
    """Maximize ``loss_fn`` over the eps-ball around x (inputs in [0, 1]); returns x_adv, detached.

    ``loss_fn`` must return a scalar that sums per-sample losses (so each sample's step does not
    depend on the batch size). ``step_size`` defaults to eps / 4 (2.5 * eps / steps for L2 when
    larger). ``x_init`` overrides the start point (TRADES starts at x + 0.001 * noise).
    eps == 0 or steps == 0 returns x unchanged.
    """
    x = x.detach()
    if eps <= 0 or steps <= 0:
        return x.clone()
    step_size = _default_step(eps, steps, norm) if step_size is None else step_size
    return _ascent(loss_fn, x, _start(x, eps, norm, rand_init, generator, x_init), eps, steps, step_size, norm)


def _ascent(loss_fn: Objective, x: torch.Tensor, delta: torch.Tensor, eps: float, steps: int, step_size: float,
            norm: Norm) -> torch.Tensor:
    """``steps`` ascent steps on ``loss_fn`` from x + delta; returns x_adv, detached."""
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = _ascend(delta, grad, x, eps, step_size, norm)
    return (x + delta).detach()


def _default_step(eps: float, steps: int, norm: Norm) -> float:
    return eps / 4 if norm == "linf" else max(eps / 4, 2.5 * eps / steps)


def _start(x: torch.Tensor, eps: float, norm: Norm, rand_init: bool, generator: torch.Generator | None,
           x_init: torch.Tensor | None = None) -> torch.Tensor:
    if x_init is not None:
        return project(x_init.detach() - x, x, eps, norm)
    return random_start(x, eps, norm, generator) if rand_init else torch.zeros_like(x)


def _ascend(delta: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float, step_size: float,
            norm: Norm) -> torch.Tensor:
    """One ascent step (sign step for L-inf, normalized gradient for L2), projected back."""
    if norm == "linf":
        delta = delta + step_size * grad.sign()
    else:
        delta = delta + step_size * grad / _l2_norm(grad)
    return project(delta, x, eps, norm)


def ce_objective(model: nn.Module, y: torch.Tensor) -> Objective:
    """Summed cross-entropy of ``model`` at the attacked input: the usual untargeted objective."""
    return lambda xa: F.cross_entropy(model(xa), y, reduction="sum")


def pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
           step_size: float | None = None, norm: Norm = "linf", rand_init: bool = True,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted PGD on cross-entropy with the model in eval mode (its mode restored afterwards).

    Sharded over CPU threads inside ``cpu_attack_shards`` (raydefense.attacks.shards).
    """
    def run(xs: torch.Tensor, ys: torch.Tensor, ds: torch.Tensor, step: float) -> torch.Tensor:
        return _ascent(ce_objective(model, ys), xs, ds, eps, steps, step, norm)

    return _sharded_ce_attack(run, model, x, y, eps, steps, step_size, norm, rand_init, generator)


def pgd_ce_until_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20,
                        step_size: float | None = None, norm: Norm = "linf", rand_init: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Evaluation PGD on cross-entropy that keeps, per sample, the first iterate that fools the model.

    A sample leaves the batch as soon as an iterate is misclassified (read off the logits the
    step computes anyway, so no extra forward pass); the others follow exactly the trajectory of
    ``pgd_ce`` with the same generator (same random start, per-sample summed loss, no batch
    statistics in eval mode). So every sample ``pgd_ce`` breaks is broken here too, plus those
    whose intermediate iterates were misclassified but not the last one: robust accuracy is never
    higher, and broken samples stop costing compute (AutoAttack drops them between attacks for the
    same reason). Only for evaluation: training wants the final iterate. Sharded over CPU threads
    inside ``cpu_attack_shards``.
    """
    def run(xs: torch.Tensor, ys: torch.Tensor, ds: torch.Tensor, step: float) -> torch.Tensor:
        return _until_fooled(model, xs, ys, ds, eps, steps, step, norm)

    return _sharded_ce_attack(run, model, x, y, eps, steps, step_size, norm, rand_init, generator)


def _sharded_ce_attack(run: Callable[..., torch.Tensor], model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       eps: float, steps: int, step_size: float | None, norm: Norm, rand_init: bool,
                       generator: torch.Generator | None) -> torch.Tensor:
    """What the cross-entropy attacks share: the trivial cases, the default step, eval mode, and one
    random start drawn for the whole batch before ``run(x, y, start, step)`` is sharded."""
    x = x.detach()
    if eps <= 0 or steps <= 0:
        return x.clone()
    step = _default_step(eps, steps, norm) if step_size is None else step_size
    with eval_mode(model):
        start = _start(x, eps, norm, rand_init, generator)
        return sharded(lambda xs, ys, ds: run(xs, ys, ds, step), [x, y, start])


def _until_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float, steps: int,
                  step_size: float, norm: Norm) -> torch.Tensor:
    x_adv = x.clone()
    active = torch.arange(len(y), device=x.device)
    xs, ys = x, y
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(xs + delta)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, ys, reduction="sum"), delta)
        with torch.no_grad():
            fooled = logits.argmax(1) != ys
            if fooled.any():
                x_adv[active[fooled]] = (xs + delta)[fooled]
                keep = ~fooled
                active, xs, ys, delta, grad = active[keep], xs[keep], ys[keep], delta[keep], grad[keep]
                if len(active) == 0:
                    return x_adv
            delta = _ascend(delta.detach(), grad, xs, eps, step_size, norm)
    x_adv[active] = (xs + delta).detach()
    return x_adv


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Single signed-gradient step of size eps from x (no random start)."""
    return pgd_ce(model, x, y, eps, steps=1, step_size=eps, rand_init=False)
