"""``raydefense detect``: the ER-Detector's Table 4 metrics for every train-attack x test-attack pair."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raydefense.cli import app


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


@app.command()
def detect(
    checkpoint: Path = typer.Argument(..., help="an er, er- or er-trades checkpoint directory"),
    train_attack: str = typer.Option("pgd", help="attack(s) whose examples train the detector (comma list)"),
    test_attacks: str = typer.Option("fgsm,pgd,cw", help="attacks the detector is evaluated on (comma list)"),
    features: str = typer.Option("er1,er2", help="er1 (code) and/or er2 (code + hidden-layer means)"),
    n: Optional[int] = typer.Option(None, help="use the first N test samples [default: all]"),
    eps: Optional[str] = typer.Option(None, help="L-inf budget of fgsm/pgd [default: the dataset's standard eps]"),
    out: Optional[Path] = typer.Option(None, help="where detect.parquet and detect.md go [default: CHECKPOINT]"),
    tsne: bool = typer.Option(False, "--tsne", help="also write t-SNE plots of clean vs adversarial codes"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
) -> None:
    """ER-Detector (Li et al.): class-wise KDE of codes + logistic regression; 20 % / 80 % test split."""
    from raydefense.checkpoint import read_config
    from raydefense.cli.ui import console
    from raydefense.data import parse_eps
    from raydefense.detect.er_detector import TABLE_COLUMNS, detect_checkpoint
    from raydefense.errors import UserError
    from raydefense.report import rich_table

    read_config(checkpoint)
    train, test, kinds = _names(train_attack), _names(test_attacks), _names(features)
    if not train or not test or not kinds:
        raise UserError("--train-attack, --test-attacks and --features each need at least one name")
    rows, out_dir = detect_checkpoint(checkpoint, train, test, n, parse_eps(eps) if eps is not None else None, out,
                                      kinds, seed, device, tsne)
    cols = [c for c in TABLE_COLUMNS if c not in ("bandwidth", "n_adv", "n_nat", "auroc")]
    console.print(rich_table(rows, cols, title=f"ER-Detector: {checkpoint} (set II, n={rows[0]['n_adv']})"))
    console.print(f"wrote {out_dir / 'detect.parquet'} and {out_dir / 'detect.md'}")
