"""Evaluation of a classifier that may refuse to answer (LDAT's likelihood threshold).

A model "rejects" an input when its confidence, the maximum of the softmax of its logits (for
LDAT's Gaussian-mixture head: the posterior of the likelihoods), is below ``threshold``
(paper: 0.6). Chen et al.'s defense success rate counts an input as defended when it is rejected
or classified correctly; this module reports it per attack, beside plain accuracy (no rejection)
and the rejection rate.

Two families of attacks, both on the full inference path in eval mode:

- oblivious: the usual attacks that only try to misclassify (PGD-20 L-inf and L2, DeepFool,
  optionally AutoAttack); they ignore the rejection.
- adaptive: attacks that must also get past the rejection, i.e. produce a wrong label with
  confidence >= threshold. Three objectives, per-sample best of all (``adaptive-*`` rows):
  (a) maximize the largest wrong-class log-probability: for threshold >= 0.5 a wrong class with
  probability >= threshold is exactly "misclassified and accepted"; (b) a penalty (Lagrangian)
  objective CE - kappa * relu(log threshold - log max softmax); (c) targeted PGD on each of the
  ``targets`` most likely wrong classes. Each is PGD on raydefense's engine.

Worst-case rows take the per-sample AND of "defended" over the attacks of a family (and over
all), so the reported rate is what a per-sample adaptive adversary achieves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode, pgd, pgd_ce, project
from raydefense.errors import UserError
from raydefense.names import DEFAULT_REJECT_ATTACKS

log = logging.getLogger(__name__)

REJECT_COLUMNS = ("attack", "family", "norm", "eps", "accuracy", "rejected", "defense_success",
                  "accepted_error", "n", "seconds")

# (model, x, y, eps, threshold, generator) -> x_adv
RejectAttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, float, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class RejectAttack:
    name: str
    family: str  # "clean", "oblivious" or "adaptive"
    norm: str  # "linf" or "l2"
    fn: RejectAttackFn
    params: dict = field(default_factory=dict)


@torch.no_grad()
def reject_outputs(model: nn.Module, x: torch.Tensor, threshold: float, batch_size: int = 512
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels and the reject flags (max softmax below ``threshold``)."""
    preds, rej = [], []
    for i in range(0, len(x), batch_size):
        conf, pred = model(x[i:i + batch_size]).softmax(1).max(1)
        preds.append(pred)
        rej.append(conf < threshold)
    return torch.cat(preds), torch.cat(rej)


def defense_success(pred: torch.Tensor, rejected: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Chen et al.'s per-sample defense success: rejected or correctly classified."""
    return rejected | (pred == y)


# -- adaptive objectives (summed over the batch, to maximize) -----------------------------------

def _wrong_logprobs(model: nn.Module, xa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp = F.log_softmax(model(xa), 1)
    return lp.masked_fill(F.one_hot(y, lp.shape[1]).bool(), -math.inf)


def max_wrong_objective(model: nn.Module, y: torch.Tensor):
    """Largest wrong-class log-probability: >= log(threshold) means misclassified and accepted."""
    return lambda xa: _wrong_logprobs(model, xa, y).max(1).values.sum()


def penalty_objective(model: nn.Module, y: torch.Tensor, threshold: float, kappa: float = 10.0):
    """CE minus a penalty when the confidence falls below the threshold (a fixed Lagrangian)."""
    log_t = math.log(threshold)

    def objective(xa):
        logits = model(xa)
        lp = F.log_softmax(logits, 1)
        ce = F.nll_loss(lp, y, reduction="none")
        return (ce - kappa * F.relu(log_t - lp.max(1).values)).sum()

    return objective


def targeted_objective(model: nn.Module, target: torch.Tensor):
    return lambda xa: F.log_softmax(model(xa), 1).gather(1, target[:, None]).sum()


def _fooled(model: nn.Module, xa: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    with torch.no_grad():
        conf, pred = model(xa).softmax(1).max(1)
    return (pred != y) & (conf >= threshold)


def adaptive_attack(norm: str, steps: int = 20, targets: int = 3, kappa: float = 10.0) -> RejectAttackFn:
    """Per-sample best of the three adaptive objectives (module docstring)."""

    def run(model, x, y, eps, threshold, gen):
        step = eps / 4
        best = x.clone()
        done = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        with torch.no_grad():
            logits = model(x)
            wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf)
        order = wrong.argsort(1, descending=True)[:, :targets]
        objectives = [max_wrong_objective(model, y), penalty_objective(model, y, threshold, kappa)]
        objectives += [targeted_objective(model, order[:, k]) for k in range(min(targets, order.shape[1]))]
        for objective in objectives:
            xa = pgd(objective, x, eps, steps, step, norm, generator=gen)
            hit = _fooled(model, xa, y, threshold) & ~done
            best[hit] = xa[hit]
            done |= hit
            if done.all():
                break
        return best

    return run


# -- oblivious attacks ---------------------------------------------------------------------------

def _clean(model, x, y, eps, threshold, gen):
    return x


def _pgd(norm: str, steps: int) -> RejectAttackFn:
    def run(model, x, y, eps, threshold, gen):
        return pgd_ce(model, x, y, eps, steps, eps / 4, norm, generator=gen)

    return run


def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 50, overshoot: float = 0.02,
             num_classes: int | None = None) -> torch.Tensor:
    """DeepFool (L2), batched: the same update as ``torchattacks.DeepFool`` (linearize, step to the
    nearest linearized boundary times (1 + overshoot), clamp to [0, 1], stop a sample once it is
    misclassified), but with one input-gradient call per class for the whole batch instead of
    per-sample backward passes through the weights (torchattacks' loop was ~100x slower on CPU).
    tests/test_ldat.py checks it against torchattacks."""
    x_adv = x.detach().clone()
    active = torch.ones(len(y), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        xa = x_adv[active].clone().requires_grad_(True)
        ya = y[active]
        logits = model(xa)
        k = logits.shape[1] if num_classes is None else num_classes
        still = logits.argmax(1) == ya
        grads = torch.stack([torch.autograd.grad(logits[:, c].sum(), xa, retain_graph=c + 1 < k)[0]
                             for c in range(k)], 1)  # (n, K, ...)
        with torch.no_grad():
            idx = torch.arange(len(ya), device=x.device)
            f_prime = logits - logits[idx, ya][:, None]
            w_prime = (grads - grads[idx, ya][:, None]).flatten(2)
            value = f_prime.abs() / w_prime.norm(dim=2).clamp_min(1e-12)
            value[idx, ya] = math.inf
            target = value.argmin(1)
            w = w_prime[idx, target]
            step = (f_prime[idx, target].abs() / w.norm(dim=1).pow(2).clamp_min(1e-24))[:, None] * w
            new = (xa + (1 + overshoot) * step.view_as(xa)).clamp(0, 1)
            rows = active.nonzero().squeeze(1)
            x_adv[rows[still]] = new[still]
            active[rows[~still]] = False
        if not active.any():
            break
    return x_adv.detach()


def _deepfool(model, x, y, eps, threshold, gen):
    """DeepFool (L2, 50 steps, overshoot 0.02), projected onto the L2 eps-ball."""
    xa = deepfool(model, x, y)
    return x + project(xa - x, x, eps, "l2")


def _autoattack(model, x, y, eps, threshold, gen):
    from raydefense.evaluate.attacks import ATTACKS

    return ATTACKS["aa"].fn(model, x, y, eps, gen)


REJECT_ATTACKS: dict[str, RejectAttack] = {
    "clean": RejectAttack("clean", "clean", "none", _clean),
    "pgd20": RejectAttack("pgd20", "oblivious", "linf", _pgd("linf", 20), {"steps": 20, "step": "eps/4"}),
    "pgd20-l2": RejectAttack("pgd20-l2", "oblivious", "l2", _pgd("l2", 20), {"steps": 20, "step": "eps/4"}),
    "deepfool": RejectAttack("deepfool", "oblivious", "l2", _deepfool, {"steps": 50, "overshoot": 0.02}),
    "aa": RejectAttack("aa", "oblivious", "linf", _autoattack, {"version": "standard"}),
    "adaptive-linf": RejectAttack("adaptive-linf", "adaptive", "linf", adaptive_attack("linf"),
                                  {"steps": 20, "objectives": "max-wrong, penalty, top-3 targeted"}),
    "adaptive-l2": RejectAttack("adaptive-l2", "adaptive", "l2", adaptive_attack("l2"),
                                {"steps": 20, "objectives": "max-wrong, penalty, top-3 targeted"}),
}


def resolve_reject_attacks(spec: str | list[str]) -> list[RejectAttack]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if names == ["all"]:
        names = list(REJECT_ATTACKS)
    unknown = [n for n in names if n not in REJECT_ATTACKS]
    if unknown or not names:
        raise UserError(f"unknown attack {unknown[0] if unknown else spec!r}; "
                        f"choose from all, {', '.join(REJECT_ATTACKS)}")
    if "clean" not in names:
        names.insert(0, "clean")
    return [REJECT_ATTACKS[n] for n in dict.fromkeys(names)]


@dataclass
class RejectResult:
    attack: str
    family: str
    norm: str
    eps: float
    correct: torch.Tensor  # per sample, without rejection
    rejected: torch.Tensor  # per sample
    seconds: float

    @property
    def defended(self) -> torch.Tensor:
        return self.rejected | self.correct

    def row(self, n: int) -> dict:
        return {"attack": self.attack, "family": self.family, "norm": self.norm, "eps": self.eps,
                "accuracy": float(self.correct.float().mean()), "rejected": float(self.rejected.float().mean()),
                "defense_success": float(self.defended.float().mean()),
                "accepted_error": 1.0 - float(self.defended.float().mean()), "n": n, "seconds": self.seconds}


def evaluate_rejection(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[RejectAttack],
                       linf_eps: float, l2_eps: float, threshold: float = 0.6, batch_size: int = 256,
                       seed: int = 0, on_attack: Callable[[str, int, int], None] | None = None
                       ) -> tuple[list[dict], list[RejectResult]]:
    """Rows (one per attack, then per-family and overall worst cases) and per-sample results."""
    if not 0 < threshold < 1:
        raise UserError(f"threshold must be in (0, 1), got {threshold}")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    results: list[RejectResult] = []
    with eval_mode(model):
        for k, attack in enumerate(attacks):
            eps = 0.0 if attack.family == "clean" else (linf_eps if attack.norm == "linf" else l2_eps)
            tic = time.perf_counter()
            xs = [attack.fn(model, x[i:i + batch_size], y[i:i + batch_size], eps, threshold, gen)
                  for i in range(0, len(y), batch_size)]
            xa = torch.cat(xs)
            _check_ball(xa, x, eps, attack)
            pred, rej = reject_outputs(model, xa, threshold)
            res = RejectResult(attack.name, attack.family, attack.norm, eps, (pred == y).cpu(), rej.cpu(),
                               time.perf_counter() - tic)
            log.info("%s: acc %.4f rejected %.4f defense success %.4f", attack.name,
                     *(res.row(len(y))[c] for c in ("accuracy", "rejected", "defense_success")))
            results.append(res)
            if on_attack is not None:
                on_attack(attack.name, k + 1, len(attacks))
    rows = [r.row(len(y)) for r in results]
    for family in ("oblivious", "adaptive", "all"):
        group = [r for r in results if family == "all" or r.family in (family, "clean")]
        if family != "all" and not any(r.family == family for r in group):
            continue
        correct = torch.stack([r.correct for r in group]).all(0)
        defended = torch.stack([r.defended for r in group]).all(0)
        rows.append({"attack": f"worst-{family}", "family": family, "norm": "", "eps": None,
                     "accuracy": float(correct.float().mean()), "rejected": None,
                     "defense_success": float(defended.float().mean()),
                     "accepted_error": 1.0 - float(defended.float().mean()), "n": len(y),
                     "seconds": sum(r.seconds for r in group)})
    return rows, results


def reject_checkpoint(ckpt_dir: str | Path, attacks: str | list[str] = DEFAULT_REJECT_ATTACKS,
                      threshold: float = 0.6, n: int | None = None, linf_eps: float | None = None,
                      l2_eps: float | None = None, out: str | Path | None = None, split: str = "test",
                      batch_size: int = 256, seed: int = 0, device: str = "auto", data_dir: str | None = None,
                      on_attack: Callable[[str, int, int], None] | None = None) -> tuple[list[dict], Path]:
    """Evaluate any checkpoint with max-softmax rejection; writes ``reject.parquet``.

    Budgets default to the dataset's standard L-inf eps and the paper's L2 budget (0.5 on
    CIFAR-10) scaled to the dataset and to the L-inf eps like LDAT's training budget
    (``methods.ldat.l2_scale``).
    """
    from raydefense.checkpoint import load_model, read_config
    from raydefense.data import load_splits
    from raydefense.device import resolve_device
    from raydefense.evaluate import checkpoint_dataset
    from raydefense.methods.ldat import default_l2_eval_eps
    from raydefense.provenance import provenance
    from raydefense.report import write_parquet

    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    chosen = resolve_reject_attacks(attacks)
    if not 0 < threshold < 1:
        raise UserError(f"--threshold must be in (0, 1), got {threshold}")
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    dev = resolve_device(device)
    model = load_model(ckpt_dir, dev)
    name, stored_dir = checkpoint_dataset(config)
    splits = load_splits(name, data_dir or stored_dir)
    x, y = splits[split].tensors()
    if n is not None:
        x, y = x[:n], y[:n]
    linf_eps = splits.info.standard_eps if linf_eps is None else linf_eps
    l2_eps = default_l2_eval_eps(splits.info, linf_eps) if l2_eps is None else l2_eps
    if linf_eps < 0 or l2_eps < 0:
        raise UserError("eps must be >= 0")
    rows, _ = evaluate_rejection(model, x.to(dev), y.to(dev), chosen, linf_eps, l2_eps, threshold,
                                 batch_size, seed, on_attack)
    for r in rows:
        r["threshold"] = threshold
    out_dir = Path(out) if out else ckpt_dir
    write_parquet(rows, out_dir / "reject.parquet",
                  metadata={"provenance": provenance(), "method": config.get("train", {}).get("method"),
                            "params": {a.name: a.params for a in chosen}})
    return rows, out_dir


def _check_ball(xa: torch.Tensor, x: torch.Tensor, eps: float, attack: RejectAttack) -> None:
    """An example outside [0, 1] or the budget would report a meaningless number: refuse it."""
    if attack.family == "clean":
        return
    dist = (xa - x).abs().flatten(1).max(1).values if attack.norm == "linf" else (xa - x).flatten(1).norm(dim=1)
    if xa.min() < -1e-6 or xa.max() > 1 + 1e-6 or dist.max() > eps * (1 + 1e-4) + 1e-5:
        raise RuntimeError(f"attack {attack.name} left the eps-ball or [0,1]: this is a bug, not a result")
