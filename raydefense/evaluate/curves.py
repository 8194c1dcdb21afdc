"""Accuracy-vs-eps curves and their normalized area under the curve (AFD paper, Fig. 2 / Table 2).

A robust accuracy at one budget says little about how a defense degrades beyond it. Here each
attack is run at a list of budgets; the normalized AUC (trapezoid area divided by max_eps * 1, the
area of a model that stays 100 % accurate over the whole range) sums the curve in one number in
[0, 1], comparable between models evaluated on the same eps list.

Attacks (all against the full inference path, in eval mode, inputs in [0, 1]):
``pgd`` (L-inf, 20 steps, step eps/4, random start), ``pgd-l2`` (L2, 20 steps, step eps/4,
random start; eps in L2 units), ``fgsm`` (one step of size eps), ``mim`` (torchattacks.MIFGSM:
momentum iterative FGSM, 10 steps of eps/10, decay 1.0). Self-contained on purpose: the evaluation
attack table in ``attacks.py`` answers a different question (one budget, per-sample worst case).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from raydefense.attacks import eval_mode, pgd_ce, pgd_ce_until_fooled
from raydefense.evaluate.sweeps import normalized_auc  # one definition, shared with `evaluate --eps-sweep`
from raydefense.errors import UserError
from raydefense.names import DEFAULT_CURVE_ATTACKS

log = logging.getLogger(__name__)

CurveFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class CurveAttack:
    name: str
    fn: CurveFn
    norm: str  # "linf" or "l2": which eps list it takes
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _pgd_linf(model, x, y, eps, gen):
    return pgd_ce_until_fooled(model, x, y, eps, steps=20, step_size=eps / 4, norm="linf", generator=gen)


def _pgd_l2(model, x, y, eps, gen):
    return pgd_ce_until_fooled(model, x, y, eps, steps=20, step_size=eps / 4, norm="l2", generator=gen)


def _fgsm(model, x, y, eps, gen):
    return pgd_ce(model, x, y, eps, steps=1, step_size=eps, rand_init=False)


def _mim(model, x, y, eps, gen):
    import torchattacks

    with eval_mode(model):
        attack = torchattacks.MIFGSM(model, eps=eps, alpha=eps / 10, steps=10, decay=1.0)
        return attack(x, y).detach()


CURVE_ATTACKS: dict[str, CurveAttack] = {
    "pgd": CurveAttack("pgd", _pgd_linf, "linf", {"steps": 20, "step": "eps/4", "random_start": True},
                       "PGD-20 L-inf"),
    "pgd-l2": CurveAttack("pgd-l2", _pgd_l2, "l2", {"steps": 20, "step": "eps/4", "random_start": True},
                          "PGD-20 L2 (eps in L2 units)"),
    "fgsm": CurveAttack("fgsm", _fgsm, "linf", {"steps": 1}, "FGSM L-inf"),
    "mim": CurveAttack("mim", _mim, "linf", {"steps": 10, "step": "eps/10", "decay": 1.0},
                       "momentum iterative FGSM (torchattacks.MIFGSM) L-inf"),
}


def resolve_curve_attacks(spec: str | Sequence[str]) -> list[CurveAttack]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in CURVE_ATTACKS]
    if unknown or not names:
        raise UserError(f"unknown curve attack {unknown[0] if unknown else spec!r}; "
                        f"choose from {', '.join(CURVE_ATTACKS)}")
    return [CURVE_ATTACKS[n] for n in dict.fromkeys(names)]


def default_eps_list(norm: str, standard_eps: float, num_pixels: int, points: int = 9) -> list[float]:
    """0 .. 2x the dataset's standard budget (L-inf), or 0 .. the L2 radius of the standard L-inf
    cube's corner, standard_eps * sqrt(num_pixels) (L2): wide enough to reach ~0 accuracy
    (measured on digits: PGD-AT models fall to ~0 at 1.75x (L-inf) and 0.75x (L2) of these)."""
    top = standard_eps * (2.0 if norm == "linf" else math.sqrt(num_pixels))
    return [top * i / (points - 1) for i in range(points)]


def _inside_ball(xa: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    """An attack that leaves [0, 1] or its eps-ball would report a meaningless number: refuse it."""
    dist = (xa - x).flatten(1)
    dist = dist.abs().amax(1) if norm == "linf" else dist.norm(dim=1)
    if xa.min() < -1e-6 or xa.max() > 1 + 1e-6 or float(dist.max()) > eps * (1 + 1e-4) + 1e-5:
        raise RuntimeError(f"curve attack left the {norm} eps-ball or [0,1]: this is a bug, not a result")


def accuracy_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str | CurveAttack,
                   eps_list: Sequence[float], batch_size: int = 256, seed: int = 0) -> list[float]:
    """Accuracy of ``model`` (the full inference path) under the named attack at each eps."""
    atk = CURVE_ATTACKS[attack] if isinstance(attack, str) else attack
    gen = torch.Generator(device=x.device).manual_seed(seed)
    accs = []
    with eval_mode(model):
        for eps in eps_list:
            tic, correct = time.perf_counter(), 0
            for i in range(0, len(y), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                xa = atk.fn(model, xb, yb, eps, gen) if eps > 0 else xb
                _inside_ball(xa, xb, eps, atk.norm)
                with torch.no_grad():
                    correct += int((model(xa).argmax(1) == yb).sum())
            accs.append(correct / max(1, len(y)))
            log.info("%s eps=%.4g: %.4f (%.1fs)", atk.name, eps, accs[-1], time.perf_counter() - tic)
    return accs


def curve_flags(eps_list: Sequence[float], accuracies: Sequence[float], tol: float = 0.02) -> list[str]:
    """METHODS.md sanity checks on one curve: accuracy falls with eps and nears 0 at the top."""
    pairs = sorted(zip(eps_list, accuracies))
    flags = [f"accuracy rises from {a0:.3f} at eps={e0:.4g} to {a1:.3f} at eps={e1:.4g}"
             for (e0, a0), (e1, a1) in zip(pairs, pairs[1:]) if a1 > a0 + tol]
    if pairs[-1][1] > 0.1:
        flags.append(f"accuracy {pairs[-1][1]:.3f} at the largest eps {pairs[-1][0]:.4g}: the range may be too "
                     "small to reach ~0 (or the attack is failing)")
    return flags


def auc_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Curve rows (label, attack, eps, accuracy) -> one row per model: normalized AUC per attack
    (paper Table 2 layout) plus the mean over attacks."""
    by_model: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        by_model.setdefault(r["label"], {}).setdefault(r["attack"], []).append((r["eps"], r["accuracy"]))
    table = []
    for label, curves in by_model.items():
        row: dict[str, Any] = {"model": label}
        for attack, pts in curves.items():
            eps, acc = zip(*pts)
            row[attack] = normalized_auc(eps, acc)
        row["mean"] = sum(row[a] for a in curves) / len(curves)
        table.append(row)
    return table


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per attack, one line per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for label in labels:
            pts = sorted((r["eps"], r["accuracy"]) for r in rows if r["attack"] == attack and r["label"] == label)
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
        norm = next(r["norm"] for r in rows if r["attack"] == attack)
        ax.set_title(attack)
        ax.set_xlabel(f"eps ({'L2' if norm == 'l2' else 'L-inf'})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class CurvesResult:
    rows: list[dict[str, Any]]  # one per (model, attack, eps)
    auc: list[dict[str, Any]]  # one per model
    flags: list[str]
    n: int


def _labels(ckpts: Sequence[Path], methods: Sequence[str]) -> list[str]:
    """The method name, or 'method (dir)' when two checkpoints share a method."""
    return [m if methods.count(m) == 1 else f"{m} ({c.name})" for c, m in zip(ckpts, methods)]


def run_curves(checkpoints: Sequence[str | Path], attacks: Sequence[CurveAttack],
               linf_eps: Sequence[float] | None = None, l2_eps: Sequence[float] | None = None,
               n: int | None = None, out: str | Path | None = None, split: str = "test", batch_size: int = 256,
               seed: int = 0, device: str = "auto") -> CurvesResult:
    """Curves for several checkpoints on the same data and eps lists; writes curves.parquet,
    auc.parquet and curves.png under ``out`` when given."""
    from raydefense.checkpoint import load_model, read_config
    from raydefense.data import load_splits
    from raydefense.device import resolve_device
    from raydefense.evaluate import checkpoint_dataset
    from raydefense.provenance import provenance
    from raydefense.report import write_parquet

    ckpts = [Path(c) for c in checkpoints]
    configs = [read_config(c) for c in ckpts]  # bad input fails before any attack runs
    datasets = {checkpoint_dataset(c)[0] for c in configs}
    if len(datasets) != 1:
        raise UserError(f"checkpoints come from different datasets ({', '.join(sorted(datasets))}); "
                        "curves compare models on one dataset")
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    dev = resolve_device(device)
    name, data_dir = checkpoint_dataset(configs[0])
    splits = load_splits(name, data_dir)
    x, y = splits[split].tensors()
    x, y = (x[:n], y[:n]) if n is not None else (x, y)
    x, y = x.to(dev), y.to(dev)
    num_pixels = int(x[0].numel())
    eps_for = {"linf": list(linf_eps) if linf_eps else default_eps_list("linf", splits.info.standard_eps, num_pixels),
               "l2": list(l2_eps) if l2_eps else default_eps_list("l2", splits.info.standard_eps, num_pixels)}
    methods = [c.get("train", {}).get("method", c.get("kind", "?")) for c in configs]
    labels = _labels(ckpts, methods)
    rows, flags = [], []
    for ckpt, label in zip(ckpts, labels):
        model = load_model(ckpt, dev)
        for atk in attacks:
            eps = eps_for[atk.norm]
            accs = accuracy_curve(model, x, y, atk, eps, batch_size, seed)
            flags += [f"{label} / {atk.name}: {f}" for f in curve_flags(eps, accs)]
            rows += [{"checkpoint": str(ckpt), "label": label, "attack": atk.name, "norm": atk.norm, "eps": e,
                      "accuracy": a, "n": len(y)} for e, a in zip(eps, accs)]
    result = CurvesResult(rows, auc_table(rows), flags, len(y))
    if out is not None:
        out = Path(out)
        meta = {"provenance": provenance(), "split": split, "attacks": {a.name: a.params for a in attacks},
                "flags": flags}
        write_parquet(rows, out / "curves.parquet", metadata=meta)
        write_parquet(result.auc, out / "auc.parquet", metadata=meta)
        plot_curves(rows, out / "curves.png")
    return result


__all__ = ["CURVE_ATTACKS", "DEFAULT_CURVE_ATTACKS", "CurveAttack", "accuracy_curve", "auc_table", "curve_flags",
           "default_eps_list", "normalized_auc", "plot_curves", "resolve_curve_attacks", "run_curves"]
