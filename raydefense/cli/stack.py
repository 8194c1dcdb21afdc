"""``raydefense stack afs <sweep-dir>``: the AFS stacking model from a finished sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from raydefense.cli import app

stack_app = typer.Typer(no_args_is_help=True, help="Assemble ensembles from trained models.")
app.add_typer(stack_app, name="stack")


@stack_app.command("afs")
def stack_afs(
    sweep_dir: Path = typer.Argument(..., help="output directory of `raydefense sweep afs`"),
    select: str = typer.Option("auto", help="'auto' (Delta_z concavity rule) or budgets such as 3..8"),
    alpha: str = typer.Option("0.5", help="clean-loss weight; a list (0,0.2,0.5,0.8,1) gives the paper's Table 2"),
    epochs: Optional[int] = typer.Option(None, help="merger epochs [default: 15, MergerConfig.epochs]"),
    eps: Optional[str] = typer.Option(None, help="merger budget [default: the dataset's standard eps]"),
    lr: float = typer.Option(0.1, help="merger learning rate"),
    n: Optional[int] = typer.Option(None, help="evaluate on the first N test samples [default: all]"),
    attacks: str = typer.Option("clean,pgd20,aa", help="evaluation attacks (aa: reference AutoAttack)"),
    concavity_tol: float = typer.Option(0.05, help="relative tolerance of the concavity rule"),
    seed: int = typer.Option(0),
) -> None:
    """Select extractors, train the linear merger through the whole stack, evaluate on the test split."""
    from raydefense.cli.ui import console, err_console
    from raydefense.data import parse_eps
    from raydefense.errors import UserError
    from raydefense.report import rich_table
    from raydefense.stack import MergerConfig
    from raydefense.stack_afs import run_stack

    try:
        alphas = [float(a) for a in alpha.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"cannot read --alpha {alpha!r}; write e.g. 0.5 or 0,0.2,0.5,0.8,1") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise UserError(f"--alpha values must lie in [0, 1], got {alpha!r}")
    epochs = MergerConfig.epochs if epochs is None else epochs
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    merger = MergerConfig(alpha=alphas[0], eps=parse_eps(eps) if eps else None, epochs=epochs, lr=lr, seed=seed)
    with err_console.status("stacking") as status:
        outcome = run_stack(sweep_dir, select, alphas, merger, n, attacks, concavity_tol,
                            on_step=lambda s: status.update(s))
    console.print("[bold]Selection[/] (Table 3):")
    for budget, why in outcome.selection.reasons.items():
        console.print(f"  budget {budget:g}: {why}")
    stacks = [r for r in outcome.rows if r["kind"] == "stack"]
    singles = [r for r in outcome.rows if r["kind"] == "extractor"]
    if len(stacks) > 1:
        console.print(rich_table(stacks, ["alpha", "clean_acc", "pgd20_acc", "aa_acc", "tradeoff", "val_tradeoff"],
                                 title="Table 2: merger alpha sweep (test split)"))
    chosen = next(r for r in stacks if r["alpha"] == outcome.chosen_alpha)
    rows = [{"model": f"stack (alpha {chosen['alpha']:g})", **chosen}] + \
           [{"model": f"extractor {r['budget']:g}", **r} for r in singles]
    console.print(rich_table(rows, ["model", "clean_acc", "pgd20_acc", "aa_acc", "tradeoff", "importance"],
                             title=f"Stack vs its extractors (test split; trade-off = mean(clean, "
                                   f"{'AutoAttack' if chosen['tradeoff_attack'] == 'aa' else 'worst case of the attacks run'}))"))
    best_single = max(singles, key=lambda r: r["tradeoff"])
    verdict = "beats" if chosen["tradeoff"] > best_single["tradeoff"] else "does NOT beat"
    console.print(f"stack trade-off {chosen['tradeoff']:.4f} {verdict} the best single extractor "
                  f"(budget {best_single['budget']:g}: {best_single['tradeoff']:.4f})")
    for flag in outcome.flags:
        console.print(f"[bold red]unreliable:[/] {escape(flag)}")
    console.print(f"wrote {outcome.checkpoint} and {outcome.table}")
