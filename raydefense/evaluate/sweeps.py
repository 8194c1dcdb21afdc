"""Accuracy vs eps (with normalized AUC, AFD paper Table 2) and accuracy vs PGD steps.

Both sweeps reuse ``run_attacks`` (so they shard over Ray and resume from the cache) and add
their own sanity flags: accuracy must not rise with eps, must reach about chance at the largest
eps, and must not rise with more steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from raydefense.evaluate.attacks import LARGE_EPS_LINF, EvalAttack, pgd_attack
from raydefense.evaluate.runner import _tol, run_attacks

log = logging.getLogger(__name__)

EPS_MULTIPLIERS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
STEPS = (1, 2, 5, 10, 20, 50, 100)


def normalized_auc(eps: Sequence[float], acc: Sequence[float]) -> float:
    """Trapezoid area under accuracy(eps) divided by the eps range: 1.0 means 100 % everywhere.

    With a grid starting at eps 0 (clean accuracy) this is the AFD paper's Table 2 AUC (area / max eps)."""
    if len(eps) != len(acc):
        raise ValueError("need as many accuracies as eps values")
    pts = sorted(zip(eps, acc))
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        raise ValueError("normalized AUC needs at least two distinct eps values")
    area = sum((e1 - e0) * (a0 + a1) / 2 for (e0, a0), (e1, a1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def default_eps_grid(eps: float) -> list[float]:
    return [round(m * eps, 8) for m in EPS_MULTIPLIERS]


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[EvalAttack], eps_grid: Sequence[float],
              batch_size: int = 256, seed: int = 0, workers: int = 1, cache_dir: Path | None = None,
              num_classes: int | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Rows (attack, eps, accuracy, n), AUC rows (attack, auc, eps_min, eps_max) and flags.

    The eps values apply to each attack's own norm (give an L2 grid for L2 attacks). eps 0 is
    clean accuracy for every attack.
    """
    attacks = [a for a in attacks if a.kind != "none"]
    rows: list[dict] = []
    for e in eps_grid:
        res = run_attacks(model, x, y, attacks, e, batch_size, seed, eps_l2=e, workers=workers,
                          cache_dir=cache_dir, diagnose=False) if e > 0 else None
        for a in attacks:
            if res is None:
                acc = float((_clean_correct(model, x, y, batch_size)).float().mean())
            else:
                acc = res.by_name()[a.name].accuracy
            rows.append({"attack": a.name, "norm": a.norm, "eps": float(e), "accuracy": acc, "n": len(y)})
    aucs, flags = [], []
    t = _tol(len(y), 0.01)
    for a in attacks:
        pts = sorted((r["eps"], r["accuracy"]) for r in rows if r["attack"] == a.name)
        if len({e for e, _ in pts}) > 1:
            aucs.append({"attack": a.name, "auc": normalized_auc(*zip(*pts)), "eps_min": pts[0][0],
                         "eps_max": pts[-1][0], "points": len(pts)})
        for (e0, a0), (e1, a1) in zip(pts, pts[1:]):
            if a1 > a0 + t:
                flags.append(f"[eps-monotone] {a.name}: accuracy rises from {a0:.3f} at eps {e0:.4g} to {a1:.3f} "
                             f"at eps {e1:.4g}")
        if num_classes and a.norm == "linf" and pts and pts[-1][0] >= LARGE_EPS_LINF and pts[-1][1] > 1 / num_classes + t:
            flags.append(f"[large-eps] {a.name}: accuracy {pts[-1][1]:.3f} above chance ({1 / num_classes:.3f}) at "
                         f"eps {pts[-1][0]:.4g}")
    return rows, aucs, flags


def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    from raydefense.attacks import eval_mode

    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                          for i in range(0, len(y), batch_size)]).cpu()


def steps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: Sequence[int] = STEPS,
                batch_size: int = 256, seed: int = 0, workers: int = 1,
                cache_dir: Path | None = None) -> tuple[list[dict], list[str]]:
    """PGD-Linf accuracy for each number of steps (step eps/4, random start) and the steps flags."""
    attacks = [pgd_attack(s) for s in steps]
    res = run_attacks(model, x, y, attacks, eps, batch_size, seed, workers=workers, cache_dir=cache_dir,
                      diagnose=False)
    rows = [{"attack": r.attack, "steps": r.steps, "eps": r.eps, "accuracy": r.accuracy, "n": res.n}
            for r in res.results]
    t = _tol(res.n, 0.01)
    flags = [f"[steps] accuracy rises from {a['accuracy']:.3f} at {a['steps']} steps to {b['accuracy']:.3f} at "
             f"{b['steps']} steps" for a, b in zip(rows, rows[1:]) if b["accuracy"] > a["accuracy"] + t]
    return rows, flags


def plot_eps(rows: list[dict], path: Path, title: str = "", by: str = "attack") -> Path:
    """Accuracy vs eps, one line per ``by`` value (attack, or model in ``compare``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label in dict.fromkeys(r[by] for r in rows):
        pts = sorted((r["eps"], r["accuracy"]) for r in rows if r[by] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(label))
    ax.set_xlabel("eps (input scale)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_steps(rows: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["steps"] for r in rows], [r["accuracy"] for r in rows], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("PGD steps")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
