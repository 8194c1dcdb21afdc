"""``raydefense evaluate <checkpoint-dir>``: the attack battery, sweeps and sanity flags on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from raydefense.cli import app
from raydefense.errors import UserError
from raydefense.names import DEFAULT_ATTACKS, EVAL_COLUMNS

EVAL_SPLITS = ("test", "val")  # never train: accuracy on the training data says nothing about robustness


def _parse_list(text: str | None, kind: str) -> list[float] | bool | None:
    """'' / None -> off, 'default' -> the default grid, else a comma list of eps values or steps."""
    from raydefense.data import parse_eps

    if text is None:
        return None
    if text.strip().lower() in ("default", "yes", "true"):
        return True
    try:
        values = [parse_eps(v) if kind == "eps" else int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"bad --{kind}-sweep {text!r}: give a comma list (e.g. 0,1/16,3/16) or 'default'") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"bad --{kind}-sweep {text!r}: values must be >= 0")
    return values


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="checkpoint directory (train, sweep or stack output)"),
    attacks: str = typer.Option(",".join(DEFAULT_ATTACKS),
                                help="comma list, or 'all': clean, fgsm, pgd10, pgd20, pgd100, pgd20x5, pgd-l2, mim, "
                                     "cw, deepfool, aa, square, spsa, transfer (needs --surrogate)"),
    n: Optional[int] = typer.Option(None, help="evaluate the first N test samples [default: all]"),
    eps: Optional[str] = typer.Option(None, help="L-inf budget, e.g. 8/255 [default: the dataset's standard eps]"),
    eps_l2: Optional[str] = typer.Option(None, "--eps-l2",
                                         help="L2 budget for pgd-l2, cw, deepfool [default: digits 1.0, CIFAR 0.5]"),
    aa_version: str = typer.Option("standard", "--aa-version", help="AutoAttack version: standard, plus or rand"),
    surrogate: Optional[Path] = typer.Option(None, help="checkpoint to craft transfer attacks on (e.g. a natural model)"),
    eps_sweep: Optional[str] = typer.Option(None, "--eps-sweep",
                                            help="accuracy vs eps: 'default' (0..3x eps) or a list like 0,1/16,3/16"),
    sweep_attacks: str = typer.Option("fgsm,pgd20", "--sweep-attacks", help="attacks of the eps sweep"),
    steps_sweep: Optional[str] = typer.Option(None, "--steps-sweep",
                                              help="PGD accuracy vs steps: 'default' (1..100) or a list like 1,10,100"),
    workers: int = typer.Option(1, help="shard the samples over N Ray workers (one CPU each)"),
    probes: bool = typer.Option(True, help="run the cheap PGD probes behind the eps and steps flags"),
    cache: bool = typer.Option(True, help="keep per-attack per-shard results in OUT/eval_cache to resume"),
    out: Optional[Path] = typer.Option(None, help="where eval.parquet and report.md go [default: CHECKPOINT]"),
    split: str = typer.Option("test", help=f"{EVAL_SPLITS[0]} (default) or {EVAL_SPLITS[1]}"),
    batch_size: int = typer.Option(256),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    data_dir: Optional[Path] = typer.Option(None, help="override the dataset location stored in the checkpoint"),
) -> None:
    """Attack the checkpoint's full inference path; per-sample worst case over all attacks; sanity flags."""
    from raydefense.checkpoint import read_config
    from raydefense.cli.ui import console, make_progress
    from raydefense.data import parse_eps
    from raydefense.evaluate import evaluate_checkpoint, resolve_attacks
    from raydefense.report import rich_table

    if split not in EVAL_SPLITS:
        raise UserError(f"--split must be {' or '.join(EVAL_SPLITS)}, got {split!r}")
    read_config(checkpoint)  # bad input fails before any progress display
    if surrogate is not None:
        read_config(surrogate)
    elif "transfer" in attacks.split(","):
        raise UserError("attack 'transfer' needs a surrogate checkpoint (--surrogate DIR)")
    else:
        resolve_attacks(attacks, aa_version)
    eps_grid, steps = _parse_list(eps_sweep, "eps"), _parse_list(steps_sweep, "steps")
    with make_progress() as progress:
        task = progress.add_task("attacks", total=None, status="")

        def on_attack(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, status=name)

        rows, result, out_dir = evaluate_checkpoint(
            checkpoint, attacks, n, parse_eps(eps) if eps is not None else None, out, split, batch_size, seed,
            device, str(data_dir) if data_dir else None, on_attack, eps_l2=parse_eps(eps_l2) if eps_l2 else None,
            aa_version=aa_version, surrogate=surrogate, workers=workers, probes=probes, eps_sweep=eps_grid,
            sweep_attacks=sweep_attacks, steps_sweep=steps, cache=cache)
    console.print(rich_table(rows, EVAL_COLUMNS + ("flags",), title=f"{checkpoint} ({split}, n={result.n})"))
    for flag in result.flags:
        console.print(f"[bold red]unreliable:[/] {escape(flag)}")
    if not result.flags:
        console.print("sanity flags: none raised")
    console.print(f"wrote {out_dir / 'eval.parquet'} and {out_dir / 'report.md'}")
