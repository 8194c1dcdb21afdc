"""The small interface every defense implements. The loop, checkpoints, logging and Ray are not a
method's business: ``raydefense.train.fit`` drives any ``Method``.

A method builds its modules in ``build``, creates its optimizers in ``configure_optimizers``
(called only for training, so loading a checkpoint needs no optimizer), performs one batch of
training in ``train_step`` (returning floats to log) and exposes ``inference_module``: the module
that maps images in [0, 1] to logits and that every evaluation attacks end to end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from raydefense.attacks import pgd_ce
from raydefense.config import TrainConfig, build_dataclass
from raydefense.data import DatasetInfo
from raydefense.models import build_classifier, default_arch


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class MethodContext:
    cfg: TrainConfig
    info: DatasetInfo
    device: torch.device
    steps_per_epoch: int = 1
    generator: torch.Generator | None = None  # seeds the training attacks' random starts

    @property
    def arch(self) -> str:
        return self.cfg.arch or default_arch(self.info)

    @property
    def eps(self) -> float:
        return self.info.standard_eps if self.cfg.eps is None else self.cfg.eps

    @property
    def step_size(self) -> float:
        return self.cfg.attack_step_size if self.cfg.attack_step_size is not None else self.eps / 4


class Method(ABC):
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.opts = build_dataclass(self.Options, ctx.cfg.options, where=f"{self.name} options")
        self.epoch = 0  # set by fit before each epoch, for schedules
        self.batch_in_epoch = 0  # set by fit before each batch
        self.build()
        for module in self.modules().values():
            module.to(ctx.device)

    # -- to implement --------------------------------------------------------------------------
    @abstractmethod
    def build(self) -> None:
        """Create the modules (not the optimizers)."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every module whose weights form the checkpoint, by a stable name."""

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One batch of training (modules in train mode); returns losses and metrics as floats."""

    @abstractmethod
    def inference_module(self) -> nn.Module:
        """Images in [0, 1] -> logits: the whole path evaluation must attack."""

    # -- defaults ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimizer (from TrainConfig) over every module's parameters."""
        params = [p for m in self.modules().values() for p in m.parameters()]
        return {"main": self.make_optimizer(params)}

    def epoch_diagnostics(self, val_x: torch.Tensor, val_y: torch.Tensor) -> dict[str, float]:
        """Extra per-epoch validation metrics (discriminator accuracy, Wasserstein estimate...)."""
        return {}

    # -- helpers for subclasses ----------------------------------------------------------------
    def make_optimizer(self, params, lr: float | None = None, kind: str | None = None, **extra: Any) -> torch.optim.Optimizer:
        cfg = self.ctx.cfg
        lr = cfg.lr if lr is None else lr
        if (kind or cfg.optimizer) == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=extra.get("weight_decay", 0.0),
                                    betas=extra.get("betas", (0.9, 0.999)))
        return torch.optim.SGD(params, lr=lr, momentum=extra.get("momentum", cfg.momentum),
                               weight_decay=extra.get("weight_decay", cfg.weight_decay))

    def make_classifier(self, head: nn.Module | None = None) -> nn.Module:
        return build_classifier(self.ctx.arch, self.ctx.info, head)

    @property
    def train_eps(self) -> float:
        """The training budget now: ctx.eps, ramped up linearly during the eps warm-up."""
        warmup = self.ctx.cfg.eps_warmup_epochs
        if warmup is None:
            warmup = self.ctx.info.default_eps_warmup
        if warmup <= 0:
            return self.ctx.eps
        progress = self.epoch + self.batch_in_epoch / max(1, self.ctx.steps_per_epoch)
        return self.ctx.eps * min(1.0, progress / warmup)

    @property
    def train_step_size(self) -> float:
        return self.ctx.step_size * self.train_eps / self.ctx.eps if self.ctx.eps > 0 else 0.0

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The configured PGD training attack at the current budget (eval mode, input gradients only)."""
        return pgd_ce(model, x, y, self.train_eps, self.ctx.cfg.attack_steps, self.train_step_size,
                      generator=self.ctx.generator)

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        scaler = getattr(self, "grad_scaler", None)  # set by fit for amp=fp16 (raydefense.fast)
        if scaler is not None:
            return scaler(optimizer, loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
