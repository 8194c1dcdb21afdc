"""Baselines every table needs: natural training, PGD-AT (Madry et al.), TRADES, MART."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode, pgd
from raydefense.attacks.shards import sharded
from raydefense.methods.base import Method


class SingleModelMethod(Method):
    """A method that trains one classifier and infers with it."""

    def build(self) -> None:
        self.model = self.make_classifier()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def inference_module(self) -> nn.Module:
        return self.model

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss, metrics = self.loss(x, y)
        self.step(self.optimizers["main"], loss)
        return {"loss": float(loss.detach()), **metrics}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class Natural(SingleModelMethod):
    """Standard training on clean data: the accuracy ceiling and the usual transfer surrogate."""

    name = "natural"
    selection_metric = "val_clean_acc"  # no attack in training: keep the most accurate epoch

    def loss(self, x, y):
        logits = self.model(x)
        return F.cross_entropy(logits, y), {"train_acc": float((logits.argmax(1) == y).float().mean())}


class PGDAT(SingleModelMethod):
    """Madry et al.: cross-entropy on PGD examples only (the AFS extractors' training)."""

    name = "pgd-at"

    def loss(self, x, y):
        x_adv = self.attack(self.model, x, y)
        logits = self.model(x_adv)
        return F.cross_entropy(logits, y), {"train_adv_acc": float((logits.argmax(1) == y).float().mean())}


@dataclass
class TradesOptions:
    beta: float = 6.0


def trades_adversary(model: nn.Module, x: torch.Tensor, eps: float, steps: int, step_size: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner maximization: KL(model(x') || model(x)) from x + 0.001 * N(0, 1).

    Sharded over CPU threads inside ``cpu_attack_shards`` (the KL is summed per sample).
    """
    with eval_mode(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        start = (x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device)).clamp(0, 1)

        def attack(xs: torch.Tensor, ps: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
            def kl(xa):
                return F.kl_div(F.log_softmax(model(xa), dim=1), ps, reduction="sum")

            return pgd(kl, xs, eps, steps, step_size, rand_init=False, x_init=starts)

        return sharded(attack, [x, p_clean, start])


class TRADES(SingleModelMethod):
    """Zhang et al.: CE(clean) + beta * KL(f(x) || f(x')) with x' maximizing the KL."""

    name = "trades"
    Options = TradesOptions

    def loss(self, x, y):
        ctx = self.ctx
        x_adv = trades_adversary(self.model, x, self.train_eps, ctx.cfg.attack_steps, self.train_step_size,
                                 ctx.generator)
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
        return natural + self.opts.beta * robust, {"ce": float(natural.detach()), "kl": float(robust.detach())}


@dataclass
class MartOptions:
    beta: float = 6.0


class MART(SingleModelMethod):
    """Wang et al. 2020: boosted CE on adversarial examples + KL weighted by (1 - p_y(x))."""

    name = "mart"
    Options = MartOptions

    def loss(self, x, y):
        x_adv = self.attack(self.model, x, y)
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        probs_adv = F.softmax(logits_adv, 1)
        top2 = probs_adv.argsort(1)[:, -2:]
        runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), runner_up)
        probs = F.softmax(logits, 1)
        p_true = probs.gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(probs_adv + 1e-12), probs, reduction="none").sum(1)
        robust = (kl * (1.0000001 - p_true)).mean()
        return bce + self.opts.beta * robust, {"bce": float(bce.detach()), "kl": float(robust.detach())}
