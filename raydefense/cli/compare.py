"""``raydefense compare DIR...``: several evaluated models in one table and one accuracy-vs-eps plot."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from raydefense.cli import app


@app.command()
def compare(
    dirs: List[Path] = typer.Argument(..., help="directories holding eval.parquet (from `raydefense evaluate`)"),
    out: Path = typer.Option(Path("."), help="where compare.parquet and compare_eps.png go"),
    attack: Optional[str] = typer.Option(None, help="attack whose eps sweep is plotted [default: pgd20]"),
) -> None:
    """Line up evaluated models: accuracy per attack and accuracy vs eps."""
    from raydefense.cli.ui import console
    from raydefense.evaluate.compare import compare as run_compare
    from raydefense.report import rich_table

    rows, columns, plot = run_compare(dirs, out, attack)
    console.print(rich_table(rows, columns, title="evaluated models"))
    console.print(f"wrote {out / 'compare.parquet'}" + (f" and {plot}" if plot else " (no eps sweeps to plot)"))
