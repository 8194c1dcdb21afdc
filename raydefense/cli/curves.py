"""``raydefense curves <ckpt>...``: accuracy-vs-eps curves and normalized AUC per attack."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from raydefense.cli import app
from raydefense.names import DEFAULT_CURVE_ATTACKS


def _eps_list(text: Optional[str]) -> Optional[list[float]]:
    """'0,1/16,2/16' -> floats; 0 is always included so each curve starts at clean accuracy."""
    from raydefense.data import parse_eps
    from raydefense.errors import UserError

    if text is None:
        return None
    values = sorted({parse_eps(t) for t in text.split(",") if t.strip()} | {0.0})
    if len(values) < 2:
        raise UserError("--eps-list needs at least one eps > 0")
    return values


@app.command()
def curves(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint directories to compare"),
    attacks: str = typer.Option(",".join(DEFAULT_CURVE_ATTACKS), help="comma list of pgd, pgd-l2, fgsm, mim"),
    eps_list: Optional[str] = typer.Option(None, help="L-inf budgets, e.g. 0,1/16,2/16 (default: 9 points, 0..2x "
                                                      "the dataset's standard eps)"),
    l2_eps_list: Optional[str] = typer.Option(None, help="L2 budgets for pgd-l2 (default: 9 points, 0.."
                                                         "standard eps * sqrt(pixels))"),
    n: Optional[int] = typer.Option(None, help="use the first N samples of the split (default: all)"),
    out: Path = typer.Option(Path("curves"), help="directory for curves.parquet, auc.parquet, curves.png"),
    split: str = typer.Option("test", help="test (default) or val"),
    batch_size: int = typer.Option(256),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
) -> None:
    """Run each attack at each eps on every checkpoint; print the normalized AUC table."""
    from raydefense.cli.ui import console
    from raydefense.evaluate.curves import run_curves
    from raydefense.evaluate.curves import resolve_curve_attacks
    from raydefense.report import rich_table

    chosen = resolve_curve_attacks(attacks)
    result = run_curves(checkpoints, chosen, _eps_list(eps_list), _eps_list(l2_eps_list), n, out, split,
                        batch_size, seed, device)
    columns = ["model"] + [a.name for a in chosen] + ["mean"]
    console.print(rich_table(result.auc, columns, title=f"normalized AUC ({split}, n={result.n})"))
    for flag in result.flags:
        console.print(f"[bold yellow]check:[/] {escape(flag)}")
    console.print(f"wrote {out / 'curves.parquet'}, {out / 'auc.parquet'} and {out / 'curves.png'}")
