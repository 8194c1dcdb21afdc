"""``raydefense reject <checkpoint-dir>``: accuracy and defense success with a confidence threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raydefense.cli import app
from raydefense.names import DEFAULT_REJECT_ATTACKS

SHOWN = ("attack", "family", "eps", "accuracy", "rejected", "defense_success", "n")  # all columns: reject.parquet


@app.command()
def reject(
    checkpoint: Path = typer.Argument(..., help="checkpoint directory"),
    threshold: float = typer.Option(0.6, help="reject when the max softmax (posterior) is below this"),
    n: Optional[int] = typer.Option(None, help="evaluate the first N test samples [default: all]"),
    attacks: str = typer.Option(",".join(DEFAULT_REJECT_ATTACKS), help="comma list, or 'all' (adds aa)"),
    eps: Optional[str] = typer.Option(None, help="L-inf budget [default: the dataset's standard eps]"),
    l2_eps: Optional[str] = typer.Option(None, help="L2 budget [default: the paper's 0.5 scaled to the dataset]"),
    out: Optional[Path] = typer.Option(None, help="where reject.parquet goes [default: CHECKPOINT]"),
    split: str = typer.Option("test", help="test (default) or val"),
    batch_size: int = typer.Option(256),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
) -> None:
    """Defense success rate (rejected or correct) under oblivious and adaptive attacks (LDAT)."""
    from raydefense.checkpoint import read_config
    from raydefense.cli.ui import console, make_progress
    from raydefense.data import parse_eps
    from raydefense.evaluate.rejection import reject_checkpoint, resolve_reject_attacks
    from raydefense.report import rich_table

    read_config(checkpoint)  # bad input fails before any progress display
    resolve_reject_attacks(attacks)
    with make_progress() as progress:
        task = progress.add_task("attacks", total=None, status="")

        def on_attack(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, status=name)

        rows, out_dir = reject_checkpoint(
            checkpoint, attacks, threshold, n, parse_eps(eps) if eps is not None else None,
            parse_eps(l2_eps) if l2_eps is not None else None, out, split, batch_size, seed, device,
            on_attack=on_attack)
    console.print(rich_table(rows, SHOWN, title=f"{checkpoint} ({split}, threshold {threshold:g})"))
    console.print(f"wrote {out_dir / 'reject.parquet'}")
