"""Several small models (e.g. one per AFS budget) trained in one process as one batched model.

``torch.func.stack_module_state`` stacks the models' parameters along a new leading dimension and
``vmap(functional_call)`` runs them together, so 10 budgets' small CNNs cost a few large kernels
instead of 10 x many tiny ones (the per-op overhead dominates 8x8 inputs; it matters most on a GPU
where one small model leaves the device idle). SGD is element-wise, so one optimizer over the
stacked parameters updates each model exactly as its own optimizer would; the summed loss gives
each model's slice its own gradient. Each model attacks with its own eps.

BatchNorm works per model: the stacked buffers go into vmap batched like the parameters, so in train
mode each model's batch statistics update its own running mean and variance in place (a test checks
them against separately trained models). Like ``pgd_ce``, the attack runs in eval mode (running
statistics) and the caller's mode is restored for the weight update. Dropout is refused by vmap
(``randomness="error"``) rather than sharing one mask across models.
A building block: ``sweep afs`` still runs one trial per budget (see docs/performance.md).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from raydefense.attacks.pgd import eval_mode
from raydefense.errors import UserError


def check_stackable(models: list[nn.Module]) -> None:
    if not models:
        raise UserError("no models to stack")
    if len({type(m) for m in models}) > 1:
        raise UserError("stacked training needs models of one architecture")
    shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in models}
    if len(shapes) > 1:
        raise UserError("stacked training needs models of one architecture with the same shapes")


class StackedModels:
    """M models of one architecture as one callable: (M, B, ...) images -> (M, B, classes) logits."""

    def __init__(self, models: list[nn.Module]):
        check_stackable(models)
        self.n = len(models)
        self.params, self.buffers = stack_module_state(models)  # leaves that require grad
        self.base = copy.deepcopy(models[0]).to("meta")

        def one(params, buffers, x):
            return functional_call(self.base, (params, buffers), (x,))

        self._call = vmap(one)  # randomness="error": a model with dropout is refused, not silently shared

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(self.params, self.buffers, x)

    @property
    def training(self) -> bool:
        return self.base.training

    def train(self, mode: bool = True) -> "StackedModels":
        """Train mode for every model (BatchNorm uses and updates batch statistics)."""
        self.base.train(mode)
        return self

    def eval(self) -> "StackedModels":
        return self.train(False)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each model's weights, for a checkpoint per model."""
        return [{**{k: v[i].detach().clone() for k, v in self.params.items()},
                 **{k: v[i].clone() for k, v in self.buffers.items()}} for i in range(self.n)]


def _per_model(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def stacked_pgd(stack: StackedModels, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int,
                step_size: torch.Tensor, rand_init: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD on summed CE for every model at its own eps: x (B, ...) -> x_adv (M, B, ...).
    Runs the models in eval mode, as ``pgd_ce`` does, and restores their mode."""
    xs = x.detach().unsqueeze(0).expand(stack.n, *x.shape)
    e, a = _per_model(eps, xs), _per_model(step_size, xs)
    if rand_init:
        delta = (torch.rand(xs.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * e
    else:
        delta = torch.zeros_like(xs)
    delta = (xs + delta).clamp(0, 1) - xs
    yy = y.repeat(stack.n)
    with eval_mode(stack.base):  # the base module's mode is every stacked model's mode
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = stack(xs + delta)
            loss = F.cross_entropy(logits.flatten(0, 1), yy, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = torch.maximum(torch.minimum(delta + a * grad.sign(), e), -e)
                delta = (xs + delta).clamp(0, 1) - xs
    return (xs + delta).detach()


def stacked_pgd_at_step(stack: StackedModels, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                        eps: torch.Tensor, steps: int, step_size: torch.Tensor, rand_init: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """One PGD-AT step of every model (Madry: mean CE on its own PGD examples); returns the M losses."""
    x_adv = stacked_pgd(stack, x, y, eps, steps, step_size, rand_init, generator)
    logits = stack(x_adv)
    losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(stack.n), reduction="none").view(stack.n, -1).mean(1)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()
