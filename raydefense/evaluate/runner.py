"""Run attacks on a model and keep per-sample results, so the worst case is exact.

A sample counts as robust only if every attack (clean included) leaves it correctly classified:
the ``worst-case`` row is the per-sample AND over all attacks, never the minimum of accuracies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from raydefense.attacks import eval_mode
from raydefense.evaluate.attacks import EvalAttack

log = logging.getLogger(__name__)

WORST = "worst-case"


@dataclass
class AttackResult:
    attack: str
    eps: float
    correct: torch.Tensor  # bool per sample
    seconds: float
    params: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else float("nan")


@dataclass
class EvalResult:
    results: list[AttackResult]
    n: int
    flags: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, AttackResult]:
        return {r.attack: r for r in self.results}

    def worst_case(self) -> torch.Tensor:
        correct = torch.ones(self.n, dtype=torch.bool)
        for r in self.results:
            correct &= r.correct
        return correct


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def run_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[EvalAttack], eps: float,
                batch_size: int = 256, seed: int = 0,
                on_attack: Callable[[str, int, int], None] | None = None) -> EvalResult:
    """Evaluate ``model`` (the full inference path) under each attack, in eval mode."""
    results = []
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with eval_mode(model):
        for k, attack in enumerate(attacks):
            tic = time.perf_counter()
            correct = []
            for i in range(0, len(y), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                xa = attack.fn(model, xb, yb, eps, gen) if attack.name != "clean" else xb
                _check_inside_ball(xa, xb, eps, attack)
                correct.append((_predict(model, xa, batch_size) == yb).cpu())
            res = AttackResult(attack.name, 0.0 if attack.name == "clean" else eps, torch.cat(correct),
                               time.perf_counter() - tic, dict(attack.params))
            log.info("%s: %.4f (%.1fs)", attack.name, res.accuracy, res.seconds)
            results.append(res)
            if on_attack is not None:
                on_attack(attack.name, k + 1, len(attacks))
    result = EvalResult(results, len(y))
    result.flags = sanity_flags(result)
    return result


def _check_inside_ball(xa: torch.Tensor, x: torch.Tensor, eps: float, attack: EvalAttack) -> None:
    """An attack that leaves [0,1] or the eps-ball would report a meaningless number: refuse it."""
    if attack.norm != "linf" or attack.name == "clean":
        return
    if xa.min() < -1e-6 or xa.max() > 1 + 1e-6 or (xa - x).abs().max() > eps + 1e-5:
        raise RuntimeError(f"attack {attack.name} left the eps-ball or [0,1]: this is a bug, not a result")


def sanity_flags(result: EvalResult, tol: float = 0.01) -> list[str]:
    """The checks of METHODS.md that one evaluation at one eps can make."""
    acc = {r.attack: r.accuracy for r in result.results}
    flags = []
    order = [a for a in ("clean", "fgsm", "pgd10", "pgd20", "pgd100") if a in acc]
    for weaker, stronger in zip(order, order[1:]):
        if weaker != "clean" and acc[stronger] > acc[weaker] + tol:
            flags.append(f"{stronger} ({acc[stronger]:.3f}) above {weaker} ({acc[weaker]:.3f}): "
                         "a stronger attack should not raise accuracy")
    pgd = [acc[a] for a in ("pgd10", "pgd20", "pgd100") if a in acc]
    if "aa" in acc and pgd and acc["aa"] > min(pgd) + tol:
        flags.append(f"AutoAttack ({acc['aa']:.3f}) above PGD ({min(pgd):.3f})")
    if "clean" in acc and any(acc[a] > acc["clean"] + tol for a in acc if a != "clean"):
        flags.append("an attack raised accuracy above clean accuracy")
    return flags
