"""Evaluation attacks by name. Each takes (model, x, y, eps, generator) and returns x_adv in [0,1].

The model passed in is the full inference path in eval mode. FGSM and PGD use raydefense's own
PGD engine (verified against torchattacks in tests); AutoAttack is the reference implementation
(pyautoattack), never a re-implementation. ``raydefense.evaluate`` grows this table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from raydefense.attacks import eval_mode, pgd_ce
from raydefense.errors import UserError

log = logging.getLogger(__name__)

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class EvalAttack:
    name: str
    fn: AttackFn
    params: dict[str, Any] = field(default_factory=dict)
    norm: str = "linf"
    description: str = ""


def _clean(model, x, y, eps, gen):
    return x


def _fgsm(model, x, y, eps, gen):
    return pgd_ce(model, x, y, eps, steps=1, step_size=eps, rand_init=False)


def _pgd(steps: int, restarts: int = 1) -> AttackFn:
    def run(model, x, y, eps, gen):
        best = x.clone()
        still_correct = torch.ones(len(y), dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            xa = pgd_ce(model, x, y, eps, steps=steps, step_size=eps / 4, generator=gen)
            with torch.no_grad():
                fooled = model(xa).argmax(1) != y
            take = fooled & still_correct
            best[take] = xa[take]
            still_correct &= ~fooled
            if restarts > 1 and not still_correct.any():
                break
        if restarts == 1:
            return xa
        return best

    return run


def _autoattack(version: str) -> AttackFn:
    def run(model, x, y, eps, gen):
        from pyautoattack import AutoAttack

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen).item()) if gen is not None else 0
        adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, device=x.device, seed=seed)
        with eval_mode(model):
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
        return x_adv

    return run


ATTACKS: dict[str, EvalAttack] = {
    "clean": EvalAttack("clean", _clean, description="no attack"),
    "fgsm": EvalAttack("fgsm", _fgsm, {"steps": 1}, description="FGSM, one step of size eps"),
    "pgd10": EvalAttack("pgd10", _pgd(10), {"steps": 10, "step": "eps/4", "random_start": True}),
    "pgd20": EvalAttack("pgd20", _pgd(20), {"steps": 20, "step": "eps/4", "random_start": True}),
    "pgd100": EvalAttack("pgd100", _pgd(100), {"steps": 100, "step": "eps/4", "random_start": True}),
    "aa": EvalAttack("aa", _autoattack("standard"), {"version": "standard"},
                     description="reference AutoAttack: APGD-CE, APGD-T, FAB-T, Square"),
}
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "aa")


def resolve_attacks(spec: str | list[str]) -> list[EvalAttack]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names == ["all"]:
        names = list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise UserError(f"unknown attack {unknown[0] if unknown else spec!r}; choose from all, {', '.join(ATTACKS)}")
    if "clean" not in names:
        names.insert(0, "clean")
    return [ATTACKS[n] for n in dict.fromkeys(names)]
