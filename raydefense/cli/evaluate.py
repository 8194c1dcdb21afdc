"""``raydefense evaluate <checkpoint-dir>``: the attack battery on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raydefense.cli import app
from raydefense.data import parse_eps
from raydefense.evaluate import DEFAULT_ATTACKS, EVAL_COLUMNS


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="checkpoint directory (train, sweep or stack output)"),
    attacks: str = typer.Option(",".join(DEFAULT_ATTACKS), help="comma list, or 'all'"),
    n: Optional[int] = typer.Option(None, help="evaluate the first N test samples [default: all]"),
    eps: Optional[str] = typer.Option(None, help="L-inf budget, e.g. 8/255 [default: the dataset's standard eps]"),
    out: Optional[Path] = typer.Option(None, help="where eval.parquet and report.md go [default: CHECKPOINT]"),
    split: str = typer.Option("test", help="test (default) or val"),
    batch_size: int = typer.Option(256),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    data_dir: Optional[Path] = typer.Option(None, help="override the dataset location stored in the checkpoint"),
) -> None:
    """Attack the checkpoint's full inference path; per-sample worst case over all attacks."""
    from raydefense.checkpoint import read_config
    from raydefense.cli.ui import console, make_progress
    from raydefense.evaluate import evaluate_checkpoint, resolve_attacks
    from raydefense.report import rich_table

    read_config(checkpoint)  # bad input fails before any progress display
    resolve_attacks(attacks)
    with make_progress() as progress:
        task = progress.add_task("attacks", total=None, status="")

        def on_attack(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, status=name)

        rows, result, out_dir = evaluate_checkpoint(
            checkpoint, attacks, n, parse_eps(eps) if eps is not None else None, out, split, batch_size, seed,
            device, str(data_dir) if data_dir else None, on_attack)
    console.print(rich_table(rows, EVAL_COLUMNS, title=f"{checkpoint} ({split}, n={result.n})"))
    for flag in result.flags:
        console.print(f"[bold red]unreliable:[/] {flag}")
    console.print(f"wrote {out_dir / 'eval.parquet'} and {out_dir / 'report.md'}")
