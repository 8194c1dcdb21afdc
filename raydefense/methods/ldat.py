"""LDAT: learnable-distribution adversarial training (Chen et al.; METHODS.md section ldat).

The classifier is a backbone followed by a Gaussian-mixture head (one learnable centroid per
class). Per batch:

1. delta from the paper's Algorithm 1 (``attacks.boundary``: L2, adaptive per-sample radius,
   clipped to the L2 budget at the end), or a PGD variant for the paper's Fig. 6 ablation;
2. L(x) = CE(margin logits) + lambda_t * L_lkd, L_lkd = mean 0.5 * ||f - mu_y||^2;
3. minimize (1 - beta) * L(x) + beta * L(x + delta).

lambda_t per epoch: ``linear-up`` (paper Eq. 12: t/T * lambda_init, t = 1..T), ``linear-down``
(paper Sec. 4.1: starts at lambda_init, reaches 0 at the last epoch) or ``constant``.

L2 budget on other datasets: the paper's 1.5 (and eps_init 1) are for CIFAR-10 with inputs in
[0, 1] (3072 dims, L-inf eps 8/255). By default both are scaled by
(eps / (8/255)) * sqrt(dim / 3072) with eps the run's *training* L-inf eps (``--eps``, default the
dataset's standard one), i.e. kept at the same fraction of the L2 radius of the training L-inf ball
(1.5 is 0.86 of 8/255 * sqrt(3072)). On digits at 3/16 that gives a budget of 1.29 and eps_init
0.86, at 1/4 1.73 and 1.15; on CIFAR at 8/255 exactly 1.5 and 1.

Stability: the head's logits are quadratic in the features, so the loss gradient grows with the
distance to the centroids (at init about 17 on digits: squared distances ~300) and has no bound.
Without BatchNorm (small-cnn) one SGD step at the paper's lr 0.1 overshoots: every ReLU feature
unit died in the first epoch (features 0, a constant 11.7 %-accurate model whose input gradient is
exactly 0) or the features overflowed to NaN. ``max_grad_norm`` (default 10) clips the global
gradient norm of each step, which bounds the step length without changing the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode, pgd, pgd_ce
from raydefense.attacks.boundary import boundary_attack
from raydefense.data import DatasetInfo
from raydefense.errors import UserError
from raydefense.methods.base import Method
from raydefense.models.gaussian_mixture import GaussianMixtureHead

CIFAR_EPS = 8 / 255
CIFAR_DIM = 3 * 32 * 32
PAPER_L2_BUDGET = 1.5  # CIFAR-10
PAPER_EPS_INIT = 1.0
PAPER_L2_EVAL = 0.5  # the paper's L2 evaluation budget on CIFAR-10

Schedule = Literal["linear-up", "linear-down", "constant"]
TrainAttack = Literal["boundary", "pgd-ce-l2", "pgd-ce-linf", "pgd-kl-l2", "pgd-kl-linf"]


@dataclass
class LdatOptions:
    lambda_init: float = 1.0
    lambda_schedule: Schedule = "linear-down"  # paper Sec. 4.1 (Eq. 12 is linear-up): tune both
    beta: float = 0.5  # weight of the adversarial loss (paper: 0.5 CIFAR-10, 0.3 CIFAR-100)
    margin: float = 0.1  # L-GM multiplicative margin (0.1 for 10 classes, 0.05 for 100)
    gamma: float = 0.2  # Algorithm 1 radius scaling
    l2_budget: Optional[float] = None  # None: 1.5 scaled to the dataset (module docstring)
    eps_init: Optional[float] = None  # Algorithm 1's starting radius; None: 1 scaled the same way
    attack: TrainAttack = "boundary"  # Fig. 6 ablation: PGD on CE or KL, L2 or L-inf
    reject_threshold: float = 0.6  # default confidence threshold of the rejection output
    max_grad_norm: float = 10.0  # clip each step's gradient norm (module docstring); 0: off


def l2_scale(info: DatasetInfo, eps: float | None = None) -> float:
    """How the paper's CIFAR-10 L2 numbers translate to ``info``'s dataset at L-inf ``eps``
    (default: its standard eps; module docstring)."""
    eps = info.standard_eps if eps is None else eps
    return (eps / CIFAR_EPS) * math.sqrt(math.prod(info.shape) / CIFAR_DIM)


def default_l2_budget(info: DatasetInfo, eps: float | None = None) -> float:
    return PAPER_L2_BUDGET * l2_scale(info, eps)


def default_l2_eval_eps(info: DatasetInfo, eps: float | None = None) -> float:
    """The paper's L2 evaluation budget (0.5 on CIFAR-10) scaled to the dataset at L-inf ``eps``."""
    return PAPER_L2_EVAL * l2_scale(info, eps)


def lambda_at(schedule: str, lambda_init: float, epoch: int, epochs: int) -> float:
    """lambda for the 0-based ``epoch`` of ``epochs``."""
    t, T = epoch + 1, max(1, epochs)
    if schedule == "constant":
        return lambda_init
    if schedule == "linear-up":
        return lambda_init * t / T
    if schedule == "linear-down":
        return lambda_init * (1 - epoch / (T - 1)) if T > 1 else lambda_init
    raise UserError(f"unknown lambda_schedule {schedule!r}; use linear-up, linear-down or constant")


class LDAT(Method):
    name = "ldat"
    Options = LdatOptions

    def build(self) -> None:
        o = self.opts
        if not 0 <= o.beta <= 1:
            raise UserError(f"ldat: beta must be in [0, 1], got {o.beta}")
        if not 0 < o.gamma < 1:
            raise UserError(f"ldat: gamma must be in (0, 1), got {o.gamma}")
        if o.margin < 0 or o.lambda_init < 0:
            raise UserError("ldat: margin and lambda_init must be >= 0")
        if o.max_grad_norm < 0:
            raise UserError(f"ldat: max_grad_norm must be >= 0, got {o.max_grad_norm}")
        if not 0 < o.reject_threshold < 1:
            raise UserError(f"ldat: reject_threshold must be in (0, 1), got {o.reject_threshold}")
        info = self.ctx.info
        # the backbone's output size is only known once built, so build it with a placeholder head
        self.model = self.make_classifier(nn.Identity())
        self.model.head = GaussianMixtureHead(self.model.backbone.out_dim, info.num_classes, o.margin)
        eps = self.ctx.eps  # the training eps, not the dataset's standard one (module docstring)
        self.l2_budget = default_l2_budget(info, eps) if o.l2_budget is None else o.l2_budget
        self.eps_init = PAPER_EPS_INIT * l2_scale(info, eps) if o.eps_init is None else o.eps_init
        self.attack_stats: dict[str, float] = {}

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def inference_module(self) -> nn.Module:
        return self.model

    @property
    def lam(self) -> float:
        return lambda_at(self.opts.lambda_schedule, self.opts.lambda_init, self.epoch, self.ctx.cfg.epochs)

    def adversary(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training attack: Algorithm 1, or a PGD variant (Fig. 6). The L2 budget follows the
        eps warm-up like the L-inf one."""
        o, cfg, model = self.opts, self.ctx.cfg, self.model
        ramp = self.train_eps / self.ctx.eps if self.ctx.eps > 0 else 1.0
        budget = self.l2_budget * ramp
        if o.attack == "boundary":
            x_adv, self.attack_stats = boundary_attack(model, x, y, budget, cfg.attack_steps, o.gamma, self.eps_init,
                                                       generator=self.ctx.generator, return_stats=True)
            return x_adv
        norm = "l2" if o.attack.endswith("l2") else "linf"
        eps = budget if norm == "l2" else self.train_eps
        step = None if norm == "l2" else self.train_step_size
        if o.attack.startswith("pgd-ce"):
            return pgd_ce(model, x, y, eps, cfg.attack_steps, step, norm, generator=self.ctx.generator)
        with eval_mode(model):  # TRADES-style KL attack from a small random start
            with torch.no_grad():
                p = model(x).softmax(1)
            return pgd(lambda xa: F.kl_div(F.log_softmax(model(xa), 1), p, reduction="sum"), x, eps,
                       cfg.attack_steps, step, norm, generator=self.ctx.generator)

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-input CE (with margin), L_lkd and the margin-free logits."""
        f = self.model.features(x)
        head: GaussianMixtureHead = self.model.head
        ce = F.cross_entropy(head(f, y), y)
        return ce, head.likelihood_loss(f, y), head(f).detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        o, lam = self.opts, self.lam
        x_adv = self.adversary(x, y) if o.beta > 0 else x
        ce_nat, lkd_nat, logits_nat = self.loss_terms(x, y)
        ce_adv, lkd_adv, logits_adv = self.loss_terms(x_adv, y) if o.beta > 0 else (ce_nat * 0, lkd_nat * 0, logits_nat)
        loss = (1 - o.beta) * (ce_nat + lam * lkd_nat) + o.beta * (ce_adv + lam * lkd_adv)
        self.step(self.optimizers["main"], loss)
        zero = float(((x_adv - x).flatten(1).norm(dim=1) == 0).float().mean()) if o.beta > 0 else 1.0
        return {"zero_delta": zero, **{k: v for k, v in self.attack_stats.items() if k != "zero_delta"},"loss": float(loss.detach()), "ce_nat": float(ce_nat.detach()), "ce_adv": float(ce_adv.detach()),
                "lkd_nat": float(lkd_nat.detach()), "lkd_adv": float(lkd_adv.detach()), "lambda": lam,
                "adv_l2": float((x_adv - x).flatten(1).norm(dim=1).mean()),
                "train_acc": float((logits_nat.argmax(1) == y).float().mean()),
                "train_adv_acc": float((logits_adv.argmax(1) == y).float().mean())}

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """Method.step with the global gradient norm clipped to ``max_grad_norm`` (module docstring)."""
        clip = self.opts.max_grad_norm
        scaler = getattr(self, "grad_scaler", None)
        if clip <= 0:
            return super().step(optimizer, loss)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            return None
        scaler.scaler.scale(loss).backward()  # fp16: unscale first so the clip sees true gradients
        scaler.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, clip)
        scaler.scaler.step(optimizer)
        scaler.scaler.update()
        return None

    @torch.no_grad()
    def epoch_diagnostics(self, val_x: torch.Tensor, val_y: torch.Tensor) -> dict[str, float]:
        """Mean distance to the true centroid and the clean rejection rate at the threshold."""
        f = self.model.features(val_x)
        logits = self.model.head(f)
        dist = (f - self.model.head.means[val_y]).norm(dim=1)
        rejected = logits.softmax(1).max(1).values < self.opts.reject_threshold
        return {"val_centroid_dist": float(dist.mean()), "val_clean_reject": float(rejected.float().mean())}
