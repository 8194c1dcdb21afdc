"""Named training presets: the papers' CIFAR-10 settings as TrainConfig values.

A preset only fills defaults: ``--config`` files, explicit flags and ``--set`` still override it
(``raydefense train pgd-at --preset rice2020-pgd-at --epochs 2``). Each preset's docstring cites
its source; docs/presets.md lists what differs from the papers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from raydefense.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    method: str  # the method the settings were published for
    train: dict[str, Any]  # TrainConfig fields
    options: dict[str, Any] = field(default_factory=dict)  # method options (--set)
    source: str = ""  # the docstring of the function that defines it


def rice2020_pgd_at() -> Preset:
    """PGD-AT, PreAct ResNet-18, CIFAR-10: Rice, Wong & Kolter, "Overfitting in adversarially robust
    deep learning", ICML 2020, and their code (locuslab/robust_overfitting, train_cifar.py defaults):
    200 epochs, batch 128, SGD lr 0.1 momentum 0.9 weight decay 5e-4, piecewise lr x0.1 at 50 % and
    75 % of training (epochs 100 and 150), PGD-10 eps 8/255 step 2/255, random crop of the 4-pixel
    reflect-padded image and horizontal flips, early stopping on validation robust accuracy."""
    return Preset("rice2020-pgd-at", "pgd-at", {
        "dataset": "cifar10", "arch": "preact-resnet18", "epochs": 200, "batch_size": 128,
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
        "lr_schedule": "piecewise", "lr_milestones": None, "lr_gamma": 0.1,
        "eps": 8 / 255, "attack_steps": 10, "attack_step_size": 2 / 255, "eps_warmup_epochs": 0,
        "val_attack_steps": 10, "augment": "crop,flip", "augment_padding": 4, "augment_pad_mode": "reflect"})


def afs_extractor() -> Preset:
    """AFS extractors as the paper trains them: Liu & Zhao, "Towards Both Accurate and Robust Neural
    Networks without Extra Data" (AFS, seeds/002), Sec. 3: WRN-28-10 extractors trained like "the
    prevalent PGD model with early stopping" (Rice et al. 2020, above), PGD-10 with step 2/255 at
    every budget (METHODS.md, afs step 1). The budget (eps) comes from ``sweep afs --budgets``."""
    base = rice2020_pgd_at().train
    train = {k: v for k, v in base.items() if k != "eps"}
    return Preset("afs-extractor", "pgd-at", {**train, "arch": "wrn-28-10"})


def afs_code_extractor() -> Preset:
    """AFS extractors as the authors' code trains them (anonymous1s8f2o/afs_code, train.py):
    PreAct ResNet-18, 65 epochs, batch 128, SGD lr 0.1 momentum 0.9 weight decay 5e-4, lr /10 after
    epochs 50 and 60 (their ``(1 + epoch) % 50 == 0`` on 0-based epochs: milestones 49 and 59 here),
    PGD-10 step 2/255, torchvision RandomCrop(32, 4) (zero padding) and RandomHorizontalFlip."""
    return Preset("afs-code-extractor", "pgd-at", {
        "dataset": "cifar10", "arch": "preact-resnet18", "epochs": 65, "batch_size": 128,
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
        "lr_schedule": "piecewise", "lr_milestones": [49, 59], "lr_gamma": 0.1,
        "attack_steps": 10, "attack_step_size": 2 / 255, "eps_warmup_epochs": 0,
        "val_attack_steps": 10, "augment": "crop,flip", "augment_padding": 4, "augment_pad_mode": "zeros"})


def zhang2019_trades() -> Preset:
    """TRADES, WRN-34-10, CIFAR-10: Zhang et al., "Theoretically Principled Trade-off between
    Robustness and Accuracy", ICML 2019, and their code (yaodongyu/TRADES, train_trades_cifar10.py
    defaults): beta 6, 76 epochs, batch 128, SGD lr 0.1 momentum 0.9 weight decay 2e-4, lr x0.1 at
    their epochs 75, 90 and 100 (1-based: milestones 74, 89, 99 here; only the first falls inside 76
    epochs), PGD-10 on the KL with eps 0.031 and step 0.007, RandomCrop(32, 4) and horizontal flips."""
    return Preset("zhang2019-trades", "trades", {
        "dataset": "cifar10", "arch": "wrn-34-10", "epochs": 76, "batch_size": 128,
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4,
        "lr_schedule": "piecewise", "lr_milestones": [74, 89, 99], "lr_gamma": 0.1,
        "eps": 0.031, "attack_steps": 10, "attack_step_size": 0.007, "eps_warmup_epochs": 0,
        "val_attack_steps": 10, "augment": "crop,flip", "augment_padding": 4, "augment_pad_mode": "zeros"},
        {"beta": 6.0})


_DEFINITIONS: tuple[Callable[[], Preset], ...] = (rice2020_pgd_at, afs_extractor, afs_code_extractor, zhang2019_trades)
PRESETS: dict[str, Callable[[], Preset]] = {f().name: f for f in _DEFINITIONS}


def get_preset(name: str, method: str) -> Preset:
    """The preset ``name`` for ``method``; an unknown name or another method's preset is a UserError."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    factory = PRESETS[name]
    preset = factory()
    if preset.method != method:
        raise UserError(f"preset {name!r} is a {preset.method} recipe, not {method}")
    return Preset(preset.name, preset.method, dict(preset.train), dict(preset.options),
                  " ".join((factory.__doc__ or "").split()))


def preset_values(name: str | None, method: str) -> dict[str, Any]:
    """TrainConfig values (with ``options``) of a preset, or {} without one: the lowest layer of a config."""
    if not name:
        return {}
    preset = get_preset(name, method)
    return {**preset.train, "options": dict(preset.options)}


__all__ = ["PRESETS", "Preset", "get_preset", "preset_values"]
