"""``raydefense route <rfd-checkpoint> <natural-checkpoint> --out DIR``: build (and optionally
evaluate) a routed model: inputs RFD's detector judges clean go to the natural model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from raydefense.cli import app


@app.command()
def route(
    rfd: Path = typer.Argument(..., help="checkpoint of `raydefense train rfd`"),
    natural: Path = typer.Argument(..., help="checkpoint of a naturally trained model on the same dataset"),
    out: Path = typer.Option(..., help="directory of the new, self-contained route checkpoint"),
    threshold: float = typer.Option(0.0, help="detector logit above which an input is judged adversarial"),
    evaluate: bool = typer.Option(False, "--evaluate", help="also write detection and routed-accuracy tables"),
    n: Optional[int] = typer.Option(None, help="with --evaluate: first N test samples [default: all]"),
    aa_n: int = typer.Option(200, help="with --evaluate: AutoAttack on the first AA_N samples (0: skip)"),
    steps: int = typer.Option(20, help="with --evaluate: PGD steps of the routing attacks"),
    cw_steps: int = typer.Option(50, help="with --evaluate: CW-L2 steps"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
) -> None:
    """Route clean-looking inputs to the natural model and the rest to RFD's robust classifier."""
    from raydefense.cli.ui import console
    from raydefense.errors import UserError
    from raydefense.report import rich_table
    from raydefense.route import build_route

    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if steps not in (10, 20, 100):
        raise UserError(f"--steps must be 10, 20 or 100 (the evaluation PGD variants), got {steps}")
    build_route(rfd, natural, out, threshold)
    console.print(f"route checkpoint: {out} (evaluate it with `raydefense evaluate {out}`)")
    if not evaluate:
        return
    from raydefense.evaluate.rfd_detection import DETECTION_COLUMNS, ROUTE_COLUMNS, evaluate_route

    with console.status("attacking the routed model"):
        res = evaluate_route(out, n, aa_n, steps, cw_steps, seed, device=device)
    console.print(rich_table(res["detection"], DETECTION_COLUMNS, title="detection (adversarial = positive)"))
    console.print(rich_table(res["route"], ROUTE_COLUMNS, title="routed accuracy"))
    for flag in res["flags"]:
        console.print(f"[bold red]unreliable:[/] {escape(flag)}")
    console.print(f"wrote {res['out'] / 'route_report.md'}")
