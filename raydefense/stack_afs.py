"""``raydefense stack afs <sweep-dir>``: select extractors, train mergers (one per alpha), evaluate.

Writes ``<sweep>/stack/`` (the checkpoint of the alpha with the best validation trade-off; with one
alpha, that alpha), ``<sweep>/stacks/alpha_<a>/`` when several alphas are asked for (paper Table 2)
and ``<sweep>/stack.parquet``: one row per stack (kind 'stack', one per alpha) and one per extractor
it used (kind 'extractor', with its importance ratio in the chosen stack), all on the test split:
clean, PGD-20 and AutoAttack accuracy, and the trade-off = mean(clean, AutoAttack).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from raydefense.afs import Selection, select_concave
from raydefense.budgets import parse_budgets
from raydefense.data import load_splits
from raydefense.errors import UserError
from raydefense.evaluate import resolve_attacks, run_attacks
from raydefense.report import read_parquet, write_parquet
from raydefense.stack import AFSStack, MergerConfig, load_extractor, save_stack, stack_config, train_merger

log = logging.getLogger(__name__)

STACK_COLUMNS = ("kind", "alpha", "budgets", "budget", "clean_acc", "pgd20_acc", "aa_acc", "tradeoff",
                 "importance", "val_tradeoff", "n")


@dataclass
class StackOutcome:
    selection: Selection
    rows: list[dict]
    chosen_alpha: float
    checkpoint: Path
    table: Path
    flags: list[str] = field(default_factory=list)


def read_sweep(sweep_dir: Path) -> list[dict]:
    path = Path(sweep_dir) / "sweep.parquet"
    if not path.is_file():
        raise UserError(f"{sweep_dir} holds no sweep.parquet: run `raydefense sweep afs --out {sweep_dir}` first")
    rows = [r for r in read_parquet(path) if r.get("status", "ok") == "ok" and r.get("checkpoint")]
    if not rows:
        raise UserError(f"{path} lists no finished extractor")
    return rows


def choose(rows: list[dict], select: str, tol: float) -> Selection:
    seed = min(r["seed"] for r in rows)
    by_budget = {r["budget"]: r for r in rows if r["seed"] == seed}
    if select == "auto":
        budgets = sorted(by_budget)
        return select_concave(budgets, [by_budget[b]["delta_z"] for b in budgets], tol)
    wanted = parse_budgets(select)
    missing = [b for b in wanted if b not in by_budget]
    if missing:
        raise UserError(f"--select asks for budget {missing[0]:g}, which the sweep does not have "
                        f"(it has {', '.join(f'{b:g}' for b in sorted(by_budget))})")
    return Selection(wanted, {b: "kept: chosen with --select" for b in wanted})


def _evaluate(model, x, y, eps, attacks: str, seed: int) -> dict[str, float]:
    result = run_attacks(model, x, y, resolve_attacks(attacks), eps, batch_size=len(y), seed=seed)
    acc = {r.attack: r.accuracy for r in result.results}
    # the paper's trade-off uses AutoAttack; without it, the per-sample worst case of what ran
    worst = float(result.worst_case().float().mean())
    robust, robust_name = (acc["aa"], "aa") if "aa" in acc else (worst, "worst-case")
    return {"clean_acc": acc["clean"], "pgd20_acc": acc.get("pgd20", float("nan")), "aa_acc": acc.get("aa", float("nan")),
            "tradeoff": (acc["clean"] + robust) / 2, "tradeoff_attack": robust_name, "worst_case_acc": worst,
            "n": result.n, "flags": "; ".join(result.flags)}


def run_stack(sweep_dir: Path, select: str = "auto", alphas: list[float] = (0.5,), merger: MergerConfig = MergerConfig(),
              n: int | None = None, attacks: str = "clean,pgd20,aa", tol: float = 0.05,
              on_step: Callable[[str], None] | None = None) -> StackOutcome:
    sweep_dir = Path(sweep_dir)
    rows = read_sweep(sweep_dir)
    selection = choose(rows, select, tol)
    if len(selection.kept) < 2:
        raise UserError(f"selection keeps {len(selection.kept)} extractor(s); a stack needs at least 2 (try --select)")
    seed = min(r["seed"] for r in rows)
    ckpts = {r["budget"]: Path(r["checkpoint"]) for r in rows if r["seed"] == seed}
    device = torch.device("cpu")
    extractors, configs = zip(*(load_extractor(ckpts[b], device) for b in selection.kept))
    dataset = configs[0]["dataset"]["name"]
    data_dir = configs[0]["train"].get("data_dir")
    splits = load_splits(dataset, data_dir)
    eps = splits.info.standard_eps if merger.eps is None else merger.eps
    x, y = splits.test.tensors()
    if n:
        x, y = x[:n], y[:n]

    out_rows, stacks = [], {}
    for alpha in alphas:
        if on_step:
            on_step(f"merger alpha={alpha:g}")
        torch.manual_seed(merger.seed)
        stack = AFSStack(list(extractors), splits.info.num_classes)
        cfg = replace(merger, alpha=alpha)
        best = train_merger(stack, splits, cfg)
        if on_step:
            on_step(f"evaluate stack alpha={alpha:g}")
        metrics = _evaluate(stack.eval(), x, y, eps, attacks, merger.seed)
        stacks[alpha] = (stack, cfg, best)
        out_rows.append({"kind": "stack", "alpha": alpha, "budgets": ",".join(f"{b:g}" for b in selection.kept),
                         "budget": None, "importance": None, "val_tradeoff": best["val_tradeoff"], **metrics})
    chosen = max(alphas, key=lambda a: stacks[a][2]["val_tradeoff"])  # chosen on validation, never on test
    stack, cfg, best = stacks[chosen]
    for budget, extractor, importance in zip(selection.kept, extractors, stack.importance()):
        if on_step:
            on_step(f"evaluate extractor {budget:g}")
        metrics = _evaluate(extractor, x, y, eps, attacks, merger.seed)
        out_rows.append({"kind": "extractor", "alpha": None, "budgets": None, "budget": budget,
                         "importance": importance, "val_tradeoff": None, **metrics})

    main_dir = sweep_dir / "stack"
    if main_dir.exists():
        shutil.rmtree(main_dir)
    for alpha, (s, c, b) in stacks.items():
        config = stack_config(splits.info, list(configs), list(selection.kept), c, b, data_dir)
        if len(alphas) > 1:
            save_stack(sweep_dir / "stacks" / f"alpha_{alpha:g}", s, config)
        if alpha == chosen:
            save_stack(main_dir, s, config)
    table = write_parquet(out_rows, sweep_dir / "stack.parquet",
                          metadata={"selection": {f"{k:g}": v for k, v in selection.reasons.items()},
                                    "chosen_alpha": chosen, "eps": eps})
    flags = [f"{r['kind']} {r.get('alpha') if r['kind'] == 'stack' else r.get('budget')}: {r['flags']}"
             for r in out_rows if r.get("flags")]
    return StackOutcome(selection, out_rows, chosen, main_dir, table, flags)
