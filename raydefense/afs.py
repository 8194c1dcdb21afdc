"""Adversarial Feature Stacking (Liu & Zhao): what happens per extractor and how extractors are chosen.

- ``delta_z``: paper Eq. 8, Delta_z = max over the L-inf ball of ||z(x') - z(x)||_2, estimated by
  PGD on the logit distance itself (not on the loss) and averaged over validation data. The
  authors' code does not compute it; this follows the definition.
- ``extractor_report``: the post-training hook each sweep trial runs (clean, PGD-10, PGD-20 and
  Delta_z at the evaluation budget, on the validation split).
- ``select_concave``: the selection rule. Eq. 10 holds when Delta_z is concave in the training
  budget, so we keep the run of consecutive budgets that ends at the largest budget and extends
  downwards as long as Delta_z stays concave (every interior second difference <= tol). The low
  budgets where Delta_z drops steeply (a convex kink) are dropped, as the paper drops 0..2/255 on
  CIFAR-10 and keeps the rest. Anchoring at the largest budget matters on curves that are convex
  almost everywhere (digits' Delta_z decays roughly exponentially): there the longest concave
  run, our earlier rule, was decided by noise at the tolerance and once kept budgets 0..4, the
  non-robust extractors, over 6..9.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from raydefense.attacks import eval_mode, pgd

log = logging.getLogger(__name__)


def delta_z(model: torch.nn.Module, x: torch.Tensor, eps: float, steps: int = 20, batch_size: int = 512,
            generator: torch.Generator | None = None) -> float:
    """Mean over samples of max_{||x'-x||_inf <= eps} ||z(x') - z(x)||_2 (PGD estimate, random start)."""
    if eps <= 0:
        return 0.0
    total = 0.0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            with torch.no_grad():
                z0 = model(xb)

            def logit_shift(xa: torch.Tensor) -> torch.Tensor:
                return (model(xa) - z0).norm(dim=1).sum()

            xa = pgd(logit_shift, xb, eps, steps, eps / 4, generator=generator)
            with torch.no_grad():
                total += float((model(xa) - z0).norm(dim=1).sum())
    return total / max(1, len(x))


def extractor_report(ckpt_dir: Path, splits, eval_eps: float | None = None, n_val: int | None = None,
                     seed: int = 0) -> dict[str, float]:
    """Clean / PGD-10 / PGD-20 accuracy and Delta_z of a trained extractor on the validation split."""
    from raydefense.checkpoint import load_model
    from raydefense.train import accuracy, robust_accuracy

    model = load_model(ckpt_dir)
    x, y = splits.val.tensors()
    if n_val:
        x, y = x[:n_val], y[:n_val]
    eps = splits.info.standard_eps if eval_eps is None else eval_eps
    gen = torch.Generator().manual_seed(seed)
    return {
        "eval_eps": eps,
        "clean_acc": accuracy(model, x, y),
        "pgd10_acc": robust_accuracy(model, x, y, eps, 10, generator=gen),
        "pgd20_acc": robust_accuracy(model, x, y, eps, 20, generator=gen),
        "delta_z": delta_z(model, x, eps, generator=gen),
    }


@dataclass
class Selection:
    kept: list[float]
    reasons: dict[float, str]  # budget -> why kept or dropped


def select_concave(budgets: list[float], values: list[float], rel_tol: float = 0.05) -> Selection:
    """The run of consecutive budgets ending at the largest one on which ``values`` (Delta_z) is concave.

    A point is concave when its second difference (on the possibly uneven budget grid) is
    <= rel_tol * (max - min of values); a run is judged on its interior points only, so the two
    largest budgets always form a run and it extends down past every concave point.
    """
    pairs = sorted(zip(budgets, values))
    b = [p[0] for p in pairs]
    v = [p[1] for p in pairs]
    n = len(b)
    if n < 3:
        return Selection(b, {x: "kept: fewer than 3 budgets, concavity cannot be judged" for x in b})
    tol = rel_tol * (max(v) - min(v))
    d2 = {}
    for i in range(1, n - 1):
        left = (v[i] - v[i - 1]) / (b[i] - b[i - 1])
        right = (v[i + 1] - v[i]) / (b[i + 1] - b[i])
        d2[i] = (right - left) * (b[i + 1] - b[i - 1]) / 2  # second difference scaled to the grid step
    lo, hi = n - 2, n - 1
    while lo > 0 and d2[lo] <= tol:
        lo -= 1
    reasons = {}
    for i in range(n):
        curvature = f"second difference {d2[i]:+.3g} (tol {tol:.3g})" if i in d2 else "end point"
        if i == lo and i in d2:
            reasons[b[i]] = (f"kept: lower end of the concave run {b[lo]:g}..{b[hi]:g} (a run's ends are not judged); "
                             f"{curvature}: the convex kink that ends the run")
        elif lo <= i <= hi:
            reasons[b[i]] = f"kept: inside the concave run down from the largest budget, {b[lo]:g}..{b[hi]:g}; {curvature}"
        else:
            reasons[b[i]] = f"dropped: below the convex kink at budget {b[lo]:g} that ends the concave run; {curvature}"
    return Selection(b[lo:hi + 1], reasons)
