"""Evaluation attacks by name. Each takes (model, x, y, eps, generator) and returns x_adv in [0,1].

The model passed in is the full inference path in eval mode. FGSM, PGD (L-inf and L2) and the
transfer attack use raydefense's own PGD engine (verified against torchattacks in tests);
AutoAttack is the reference implementation (pyautoattack), never a re-implementation; MIM, CW-L2,
DeepFool, Square and SPSA come from torchattacks, wrapped so that its pitfalls cannot bite:

- torchattacks switches the model to eval mode itself, but CW and DeepFool call ``backward()``,
  which would accumulate weight gradients: parameters are frozen while they run (``_frozen``).
- Square and SPSA draw from torch's global RNG: they run inside ``fork_rng`` seeded from the
  generator the runner derives per batch, so sharding cannot change their results.
- CW optimizes in tanh space and ``atanh(0)`` / ``atanh(1)`` are infinite, so saturated pixels
  (most of an 8x8 digit) could never move: the start is clamped slightly inside (0, 1).
- CW and DeepFool are minimum-norm attacks: a sample counts as broken only if the perturbation
  found is within the stated L2 budget; outside it the clean input is returned.

Normalization lives inside our models, so torchattacks' own normalization stays off, and our
inputs are already in [0, 1] (checked by the runner after every attack).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from raydefense.attacks import eval_mode, pgd_ce, pgd_ce_until_fooled
from raydefense.errors import UserError

log = logging.getLogger(__name__)

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, "torch.Generator | None"], torch.Tensor]

# Kinds, used by the sanity flags: white-box gradient attacks must beat the others.
WHITE_BOX, GRADIENT_FREE, TRANSFER, MIN_NORM, REFERENCE, NONE = (
    "white-box", "gradient-free", "transfer", "minimum-norm", "reference", "none")

# Default L2 budgets per dataset (input scale, images in [0, 1]); others fall back to 0.5.
DEFAULT_EPS_L2 = {"digits": 1.0, "mnist": 2.0, "fashion-mnist": 1.5, "cifar10": 0.5, "cifar100": 0.5,
                  "svhn": 0.5}
LARGE_EPS_LINF = 0.5  # from 0.5 every pixel can reach mid-grey: accuracy must drop to about chance


def default_eps_l2(dataset: str) -> float:
    return DEFAULT_EPS_L2.get(dataset, 0.5)


@dataclass(frozen=True)
class EvalAttack:
    name: str
    fn: AttackFn
    params: dict[str, Any] = field(default_factory=dict)
    norm: str = "linf"
    description: str = ""
    kind: str = WHITE_BOX
    eps_scale: float = 1.0  # the attack runs at eps * eps_scale ...
    eps_abs: float | None = None  # ... or at this fixed budget (sanity probes)
    steps: int | None = None  # for the "more steps must not raise accuracy" check

    def budget(self, eps: float, eps_l2: float | None) -> float:
        """The budget this attack runs at, in its own norm."""
        if self.kind == NONE:
            return 0.0
        if self.eps_abs is not None:
            return self.eps_abs
        base = eps if self.norm == "linf" else eps_l2
        if base is None:
            raise UserError(f"attack {self.name} is an L2 attack: give an L2 budget (--eps-l2)")
        return base * self.eps_scale


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad while an attack calls backward(): no weight gradients pile up."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _seeded(x: torch.Tensor, gen: torch.Generator | None) -> Iterator[int]:
    """Run code that uses torch's global RNG from a seed drawn from ``gen``, leaving the global state alone."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device if gen else "cpu").item()) \
        if gen is not None else 0
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield seed


def _within_l2(xa: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Keep the adversarial input only where its L2 distance is within the budget (min-norm attacks)."""
    dist = (xa - x).flatten(1).norm(dim=1)
    keep = (dist <= eps + 1e-6).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, xa, x)


def _clean(model, x, y, eps, gen):
    return x


def _fgsm(model, x, y, eps, gen):
    return pgd_ce(model, x, y, eps, steps=1, step_size=eps, rand_init=False)


def _pgd(steps: int, restarts: int = 1, norm: str = "linf") -> AttackFn:
    def run(model, x, y, eps, gen):
        best = x.clone()
        still_correct = torch.ones(len(y), dtype=torch.bool, device=x.device)
        xa = x
        for _ in range(restarts):
            xa = pgd_ce_until_fooled(model, x, y, eps, steps=steps, norm=norm, generator=gen)
            with torch.no_grad():
                fooled = model(xa).argmax(1) != y
            take = fooled & still_correct
            best[take] = xa[take]
            still_correct &= ~fooled
            if restarts > 1 and not still_correct.any():
                break
        return xa if restarts == 1 else best

    return run


def pgd_attack(steps: int, restarts: int = 1, norm: str = "linf", name: str | None = None, **kw: Any) -> EvalAttack:
    """A PGD attack on cross-entropy: step eps/4 (L2: max(eps/4, 2.5 eps/steps)), random start."""
    step = "eps/4" if norm == "linf" else "max(eps/4, 2.5*eps/steps)"
    return EvalAttack(name or f"pgd{steps}", _pgd(steps, restarts, norm),
                      {"steps": steps, "step": step, "random_start": True, "restarts": restarts, "norm": norm},
                      norm=norm, description=f"PGD-{'Linf' if norm == 'linf' else 'L2'} on cross-entropy",
                      steps=steps, **kw)


def _torchattacks(build: Callable[[nn.Module, float], Any], min_norm: bool = False, seeded: bool = False,
                  frozen: bool = False) -> AttackFn:
    def run(model, x, y, eps, gen):
        atk = build(model, eps)
        with eval_mode(model):
            if frozen:
                with _frozen(model):
                    xa = atk(x, y)
            elif seeded:
                with _seeded(x, gen) as s:
                    if hasattr(atk, "seed"):
                        atk.seed = s
                    xa = atk(x, y)
            else:
                xa = atk(x, y)
        xa = xa.detach().clamp(0, 1)
        return _within_l2(xa, x, eps) if min_norm else xa

    return run


class _CW:
    """torchattacks.CW with the tanh-space start clamped inside (0, 1) (see the module docstring)."""

    def __new__(cls, model, c, kappa, steps, lr):
        import torchattacks

        class CW(torchattacks.CW):
            def inverse_tanh_space(self, x):
                return self.atanh(torch.clamp(x * 2 - 1, min=-1 + 1e-3, max=1 - 1e-3))

        return CW(model, c=c, kappa=kappa, steps=steps, lr=lr)


def _mim(model, eps):
    import torchattacks

    return torchattacks.MIFGSM(model, eps=eps, alpha=eps / 4, steps=10, decay=1.0)


def _square(model, eps):
    import torchattacks

    return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=1000, n_restarts=1, p_init=0.8, seed=0)


def _spsa(model, eps):
    import torchattacks

    return torchattacks.SPSA(model, eps=eps, delta=0.01, lr=eps / 8, nb_iter=20, nb_sample=128, max_batch_size=64)


DEEPFOOL_OVERSHOOTS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _deepfool_run(model, x, y, eps, gen):
    """torchattacks.DeepFool, then a line search on the overshoot along the perturbation it found.

    torchattacks clamps to [0, 1] after every linearized step, which lands many samples back on
    the correct side of the boundary (half of them on digits); the original DeepFool applies the
    overshoot to the accumulated perturbation, which the line search restores. Each sample takes
    the smallest overshoot that fools the model (then the L2 budget decides, as for every
    minimum-norm attack).
    """
    import torchattacks

    with eval_mode(model), _frozen(model):
        xa = torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y).detach()
        delta = xa - x
        best = xa.clamp(0, 1)
        with torch.no_grad():
            done = model(best).argmax(1) != y
            for o in DEEPFOOL_OVERSHOOTS[1:]:
                cand = (x + (1 + o) * delta).clamp(0, 1)
                fooled = (model(cand).argmax(1) != y) & ~done
                best[fooled] = cand[fooled]
                done |= fooled
    return _within_l2(best, x, eps)


def _autoattack(version: str, norm: str = "Linf") -> AttackFn:
    def run(model, x, y, eps, gen):
        from pyautoattack import AutoAttack

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device).item()) if gen is not None else 0
        adversary = AutoAttack(model, norm=norm, eps=eps, version=version, device=x.device, seed=seed)
        with eval_mode(model), torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
        return x_adv

    return run


def autoattack(version: str = "standard") -> EvalAttack:
    if version not in ("standard", "plus", "rand"):
        raise UserError(f"unknown AutoAttack version {version!r}; choose standard, plus or rand")
    parts = {"standard": "APGD-CE, APGD-T, FAB-T, Square", "plus": "APGD-CE/DLR, APGD-T, FAB, FAB-T, Square (restarts)",
             "rand": "APGD-CE, APGD-DLR with EOT (randomized defenses)"}[version]
    return EvalAttack("aa", _autoattack(version), {"version": version, "norm": "Linf"},
                      description=f"reference AutoAttack ({version}): {parts}", kind=REFERENCE)


def transfer_attack(surrogate: nn.Module, steps: int = 20, label: str = "surrogate") -> EvalAttack:
    """PGD crafted on ``surrogate`` and evaluated on the target: a black-box check."""
    inner = _pgd(steps)

    def run(model, x, y, eps, gen):
        return inner(surrogate, x, y, eps, gen)

    return EvalAttack(f"transfer-pgd{steps}", run,
                      {"steps": steps, "step": "eps/4", "random_start": True, "surrogate": label},
                      description="PGD crafted on a surrogate model, evaluated on the target", kind=TRANSFER)


ATTACKS: dict[str, EvalAttack] = {
    "clean": EvalAttack("clean", _clean, description="no attack", kind=NONE),
    "fgsm": EvalAttack("fgsm", _fgsm, {"steps": 1, "step": "eps", "random_start": False},
                       description="FGSM, one step of size eps"),
    "pgd10": pgd_attack(10),
    "pgd20": pgd_attack(20),
    "pgd100": pgd_attack(100),
    "pgd20x5": pgd_attack(20, restarts=5, name="pgd20x5"),
    "pgd-l2": pgd_attack(20, norm="l2", name="pgd-l2"),
    "mim": EvalAttack("mim", _torchattacks(_mim), {"steps": 10, "step": "eps/4", "decay": 1.0, "lib": "torchattacks.MIFGSM"},
                      description="momentum iterative FGSM", steps=10),
    "cw": EvalAttack("cw", _torchattacks(lambda m, e: _CW(m, c=1.0, kappa=0.0, steps=100, lr=0.01), min_norm=True,
                                         frozen=True),
                     {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01, "lib": "torchattacks.CW",
                      "counted": "broken only if L2 distance <= eps_l2"},
                     norm="l2", description="Carlini-Wagner L2 (minimum-norm)", kind=MIN_NORM),
    "deepfool": EvalAttack("deepfool", _deepfool_run,
                           {"steps": 50, "overshoot": 0.02, "lib": "torchattacks.DeepFool",
                            "overshoot_line_search": list(DEEPFOOL_OVERSHOOTS),
                            "counted": "broken only if L2 distance <= eps_l2"},
                           norm="l2", description="DeepFool L2 (minimum-norm)", kind=MIN_NORM),
    "aa": autoattack("standard"),
    "square": EvalAttack("square", _torchattacks(_square, seeded=True),
                         {"n_queries": 1000, "p_init": 0.8, "loss": "margin", "lib": "torchattacks.Square"},
                         description="Square attack (score-based, gradient-free)", kind=GRADIENT_FREE),
    "spsa": EvalAttack("spsa", _torchattacks(_spsa, seeded=True),
                       {"nb_iter": 20, "nb_sample": 128, "delta": 0.01, "lr": "eps/8", "lib": "torchattacks.SPSA"},
                       description="SPSA (gradient-free gradient estimate)", kind=GRADIENT_FREE),
}


def sanity_probes() -> list[EvalAttack]:
    """Cheap PGD runs behind the eps and steps flags; kept out of the reported table and worst case."""
    return [
        pgd_attack(1, name="probe-pgd1", kind="probe"),
        pgd_attack(10, name="probe-pgd10@eps/2", kind="probe", eps_scale=0.5),
        pgd_attack(10, name="probe-pgd10@eps", kind="probe"),
        pgd_attack(10, name="probe-pgd10@2eps", kind="probe", eps_scale=2.0),
        pgd_attack(10, name=f"probe-pgd10@{LARGE_EPS_LINF}", kind="probe", eps_abs=LARGE_EPS_LINF),
    ]


def resolve_attacks(spec: str | list[str], aa_version: str = "standard",
                    surrogate: nn.Module | None = None, surrogate_label: str = "surrogate") -> list[EvalAttack]:
    """Attack names (comma list or 'all') -> attacks, clean first. 'transfer' needs a surrogate model."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    table = dict(ATTACKS)
    table["aa"] = autoattack(aa_version)
    if surrogate is not None:
        table["transfer"] = transfer_attack(surrogate, label=surrogate_label)
    if names == ["all"]:
        names = list(table)
    known = list(table) + ([] if "transfer" in table else ["transfer"])
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"unknown attack {unknown[0] if unknown else spec!r}; choose from all, {', '.join(known)}")
    if "transfer" in names and "transfer" not in table:
        raise UserError("attack 'transfer' needs a surrogate checkpoint (--surrogate DIR)")
    if "clean" not in names:
        names.insert(0, "clean")
    return [table[n] for n in dict.fromkeys(names)]
