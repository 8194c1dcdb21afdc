"""RFD's detector and router under attack.

``detection_rows``: the discriminator D(E_ds(G(x))) flags inputs as adversarial (logit > 0). TPR on
adversarial test inputs, TNR on the clean ones, AUROC, and TPR on the adversarial inputs that
actually fool the robust classifier, per attack: PGD-20 (the training attack family), and FGSM,
CW-L2 (torchattacks.CW) and PGD on the natural model, which training never saw.

``route_attacks``: the attacks a routed model (``raydefense.route``) is judged by. Oblivious (the
paper's setting): the attack sees only the rfd classifier or only the natural model, and the
result goes through the router. Adaptive (white box on the whole routed path): PGD on the hard
router (gradient of the selected branch), PGD on the soft-routing surrogate, PGD that maximizes
the natural model's loss while pushing the detector to say "clean", and AutoAttack (its Square
attack needs no gradient, so the hard decision does not shield it). ``run_attacks`` takes the
per-sample worst case over all of them.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode, pgd, pgd_ce
from raydefense.evaluate.attacks import ATTACKS, EvalAttack
from raydefense.evaluate.detection import detection_summary
from raydefense.route import RoutedModel, SoftRouted

log = logging.getLogger(__name__)

DETECTION_COLUMNS = ("attack", "tpr", "tnr", "auroc", "tpr_fooling", "n_fooling", "robust_acc", "mean_l2", "n")


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 50, c: float = 1.0) -> torch.Tensor:
    """The reference Carlini-Wagner L2 attack (torchattacks.CW): unbounded, minimal distortion."""
    import torchattacks

    with eval_mode(model):
        return torchattacks.CW(model, c=c, kappa=0, steps=steps, lr=0.01)(x, y).detach()


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def detection_rows(detector: nn.Module, robust: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                   natural: nn.Module | None = None, cw_steps: int = 50, seed: int = 0,
                   batch_size: int = 256) -> list[dict]:
    """One row per attack: detector TPR / TNR (threshold 0) and the robust classifier's accuracy."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    attacks = {
        "fgsm": lambda xb, yb: ATTACKS["fgsm"].fn(robust, xb, yb, eps, gen),
        "pgd20": lambda xb, yb: ATTACKS["pgd20"].fn(robust, xb, yb, eps, gen),
        "cw-l2": lambda xb, yb: cw_l2(robust, xb, yb, cw_steps),
    }
    if natural is not None:
        attacks["pgd20-on-natural"] = lambda xb, yb: ATTACKS["pgd20"].fn(natural, xb, yb, eps, gen)
    with eval_mode(detector, robust, *([natural] if natural is not None else [])):
        s_nat = _batched(detector, x, batch_size)
        rows = []
        for name, attack in attacks.items():
            x_adv = torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])
            s_adv = _batched(detector, x_adv, batch_size)
            correct = _batched(robust, x_adv, batch_size).argmax(1) == y
            summary = detection_summary(s_adv, s_nat, 0.0, correct_adv=correct)
            fooling = ~correct
            rows.append({"attack": name, "tpr": summary["tpr"], "tnr": summary["tnr"], "auroc": summary["auroc"],
                         "tpr_fooling": float((s_adv[fooling] > 0).float().mean()) if fooling.any() else math.nan,
                         "n_fooling": int(fooling.sum()), "robust_acc": float(correct.float().mean()),
                         "mean_l2": float((x_adv - x).flatten(1).norm(dim=1).mean()), "n": len(y)})
            log.info("detection %s: tpr %.3f tnr %.3f", name, summary["tpr"], summary["tnr"])
    return rows


def _oblivious(target: str, steps: int) -> EvalAttack:
    """PGD on one branch alone (the router is unknown to the attacker); scored through the router."""

    def run(model: RoutedModel, x, y, eps, gen):
        return pgd_ce(getattr(model, target), x, y, eps, steps, eps / 4, generator=gen)

    return EvalAttack(f"oblivious-pgd{steps}-{target}", run, {"steps": steps, "target": target},
                      description=f"PGD-{steps} on the {target} model alone, fed through the router")


def _soft(temperature: float, steps: int) -> EvalAttack:
    def run(model: RoutedModel, x, y, eps, gen):
        return pgd_ce(SoftRouted(model, temperature), x, y, eps, steps, eps / 4, generator=gen)

    return EvalAttack(f"soft-pgd{steps}-T{temperature:g}", run, {"steps": steps, "temperature": temperature},
                      description="PGD on the soft-routing surrogate (sigmoid(detector / T) mixes the two outputs)")


def _evade(weight: float, steps: int) -> EvalAttack:
    """Maximize CE(natural(x'), y) + weight * log P(detector says clean): fool the natural model
    and stay on its branch."""

    def run(model: RoutedModel, x, y, eps, gen):
        def objective(xa):
            s = model.detector(xa) - model.threshold
            return F.cross_entropy(model.natural(xa), y, reduction="sum") + weight * F.logsigmoid(-s).sum()

        with eval_mode(model):
            return pgd(objective, x, eps, steps, eps / 4, generator=gen)

    return EvalAttack(f"evade-detector-pgd{steps}-w{weight:g}", run, {"steps": steps, "weight": weight},
                      description="PGD: maximize the natural model's CE while pushing the detector to 'clean'")


def route_attacks(steps: int = 20, with_aa: bool = True) -> tuple[list[EvalAttack], list[EvalAttack]]:
    """(oblivious, adaptive) attack lists for a routed model."""
    oblivious = [_oblivious("robust", steps), _oblivious("natural", steps)]
    adaptive = [ATTACKS[f"pgd{steps}"] if f"pgd{steps}" in ATTACKS else ATTACKS["pgd20"],
                _soft(1.0, steps), _soft(0.1, steps), _evade(1.0, steps), _evade(10.0, steps)]
    if with_aa:
        adaptive.append(ATTACKS["aa"])
    return oblivious, adaptive


ROUTE_COLUMNS = ("setting", "attack", "accuracy", "routed_to_robust", "n")


def _recording(attack: EvalAttack, routed: list[torch.Tensor]) -> EvalAttack:
    """The same attack, also recording which of its outputs the router sends to the robust branch."""

    def run(model: RoutedModel, x, y, eps, gen):
        xa = attack.fn(model, x, y, eps, gen) if attack.name != "clean" else x
        with torch.no_grad():
            routed.append(model.flags(xa).cpu())
        return xa

    return EvalAttack(attack.name, run, attack.params, attack.norm, attack.description)


def _route_rows(setting: str, model: RoutedModel, x: torch.Tensor, y: torch.Tensor, attacks: list[EvalAttack],
                eps: float, seed: int, batch_size: int) -> tuple[list[dict], list[str]]:
    from raydefense.evaluate.runner import run_attacks

    attacks = [ATTACKS["clean"]] + [a for a in attacks if a.name != "clean"]
    routed: dict[str, list[torch.Tensor]] = {a.name: [] for a in attacks}
    result = run_attacks(model, x, y, [_recording(a, routed[a.name]) for a in attacks], eps, batch_size, seed)
    with torch.no_grad(), eval_mode(model):  # the runner never calls the clean "attack"
        routed["clean"] = [torch.cat([model.flags(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)])]
    rows = [{"setting": setting, "attack": r.attack, "accuracy": r.accuracy,
             "routed_to_robust": float(torch.cat(routed[r.attack]).float().mean()), "n": result.n}
            for r in result.results]
    rows.append({"setting": setting, "attack": "worst-case", "accuracy": float(result.worst_case().float().mean()),
                 "routed_to_robust": math.nan, "n": result.n})
    return rows, result.flags


def evaluate_route(ckpt_dir, n: int | None = None, aa_n: int = 200, steps: int = 20, cw_steps: int = 50,
                   seed: int = 0, batch_size: int = 256, device: str = "auto", out=None) -> dict:
    """Detection table and routed accuracy (oblivious, adaptive, AutoAttack) of a route checkpoint;
    writes detection.parquet, route_eval.parquet and route_report.md next to it (or into ``out``)."""
    from pathlib import Path

    from raydefense.checkpoint import atomic_write_bytes, load_model, read_config
    from raydefense.data import load_splits
    from raydefense.device import resolve_device
    from raydefense.errors import UserError
    from raydefense.report import markdown_table, write_parquet

    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    if config["kind"] != "route":
        raise UserError(f"{ckpt_dir} is not a route checkpoint (build one with `raydefense route`)")
    dev = resolve_device(device)
    model: RoutedModel = load_model(ckpt_dir, dev)
    splits = load_splits(config["dataset"]["name"], config.get("data_dir"))
    x, y = (t.to(dev) for t in splits.test.tensors())
    if n is not None:
        x, y = x[:n], y[:n]
    eps = splits.info.standard_eps
    det = detection_rows(model.detector, model.robust, x, y, eps, model.natural, cw_steps, seed, batch_size)
    oblivious, adaptive = route_attacks(steps, with_aa=False)
    rows, flags = [], []
    for setting, attacks, xs, ys in (("oblivious", oblivious, x, y), ("adaptive", adaptive, x, y),
                                     ("autoattack", [ATTACKS["aa"]], x[:aa_n], y[:aa_n])):
        if setting == "autoattack" and aa_n <= 0:
            continue
        r, f = _route_rows(setting, model, xs, ys, attacks, eps, seed, batch_size)
        rows += r
        flags += [f"{setting}: {m}" for m in f]
    out_dir = Path(out) if out else ckpt_dir
    write_parquet(det, out_dir / "detection.parquet")
    write_parquet(rows, out_dir / "route_eval.parquet", metadata={"flags": flags})
    lines = [f"# Routed model `{ckpt_dir}`", "", f"- eps {eps:.4g} (L-inf), test split, n={len(y)}, "
             f"AutoAttack n={min(aa_n, len(y))}, threshold {model.threshold}",
             f"- sources: {config.get('sources')}", "", "## Detection (threshold 0 on D(E_ds(G(x))))", "",
             markdown_table(det, DETECTION_COLUMNS), "", "## Routed accuracy", "", markdown_table(rows, ROUTE_COLUMNS)]
    if flags:
        lines += ["", "## Sanity flags", ""] + [f"- {f}" for f in flags]
    atomic_write_bytes(out_dir / "route_report.md", ("\n".join(lines) + "\n").encode())
    return {"detection": det, "route": rows, "flags": flags, "out": out_dir}


__all__ = ["DETECTION_COLUMNS", "ROUTE_COLUMNS", "cw_l2", "detection_rows", "evaluate_route", "route_attacks"]
