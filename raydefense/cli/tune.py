"""``raydefense tune <method>``: Optuna (TPE) search with ASHA early stopping on Ray Tune."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from raydefense.cli import app
from raydefense.cli.options import dataclass_options
from raydefense.config import PLACEMENT_FIELDS, TrainConfig, build_dataclass

NOT_TRAINABLE = {"afs": "the AFS merger is trained by `raydefense stack afs`; sweep its alpha with "
                        "`stack afs --alpha` (search_spaces/afs.yaml gives the range)"}


@app.command()
@dataclass_options(TrainConfig, exclude=("method", "seed", *PLACEMENT_FIELDS))
def tune(
    method: str = typer.Argument(..., help="a trainable method: pgd-at, trades, mart, ... (see METHODS.md)"),
    space: Optional[Path] = typer.Option(None, help="search space YAML [default: search_spaces/<method>.yaml]"),
    samples: int = typer.Option(16, help="number of trials"),
    objective: str = typer.Option("tradeoff", help="tradeoff (mean of val clean and PGD acc), robust, or pareto"),
    scheduler: Optional[str] = typer.Option(None, help="asha or fifo [default: asha; fifo for pareto]"),
    grace_period: int = typer.Option(2, help="ASHA: epochs every trial gets before it can be stopped"),
    reduction_factor: int = typer.Option(2, help="ASHA: keep 1/this of the trials at each rung"),
    max_concurrent: int = typer.Option(2, help="trials running at once"),
    seed: int = typer.Option(0, help="seed of the TPE sampler (trials train with --train-seed)"),
    train_seed: int = typer.Option(0, help="training seed of every trial"),
    include_default: bool = typer.Option(True, help="make the method's default configuration the first trial"),
    masking_top_k: int = typer.Option(3, help="top trials re-attacked with PGD-50 x restarts"),
    masking_threshold: float = typer.Option(0.10, help="flag (and exclude from best) above this PGD gap"),
    masking_n: int = typer.Option(256, help="validation samples for the masking check"),
    then_evaluate: bool = typer.Option(False, help="re-train the best configuration and evaluate it on the test split"),
    eval_attacks: str = typer.Option("clean,pgd20,aa", help="attacks for --then-evaluate"),
    eval_n: Optional[int] = typer.Option(None, help="test samples for --then-evaluate [default: all]"),
    out: Optional[Path] = typer.Option(None, help="run directory [default: runs/tune-<method>]"),
    cpus_per_trial: float = typer.Option(1.0, help="CPUs reserved per trial"),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs per trial; fractions pack trials on a GPU"),
    address: Optional[str] = typer.Option(None, help="join this Ray cluster (host:port or auto) [env RAY_ADDRESS]"),
    storage: Optional[str] = typer.Option(None, help="Tune results location: a path or URI (s3://...)"),
    max_failures: int = typer.Option(2, help="retries of a failed trial from its last checkpoint"),
    fresh: bool = typer.Option(False, help="delete OUT first instead of resuming"),
    overrides: dict = None,
) -> None:
    """Search a method's hyperparameters; re-running the same command resumes an interrupted search."""
    from raydefense.cli.tune_progress import TuneProgressCallback
    from raydefense.cli.ui import TrialsDisplay, console
    from raydefense.data import load_splits
    from raydefense.distributed.cluster import ray_cluster
    from raydefense.distributed.experiment import Resources
    from raydefense.errors import Interrupted, UserError
    from raydefense.methods import get_method_class
    from raydefense.report import rich_table
    from raydefense.search_space import load_search_space, space_path
    from raydefense.tune import MaskingCheck, TuneRequest, run_tune

    if method in NOT_TRAINABLE:
        raise UserError(f"cannot tune {method!r}: {NOT_TRAINABLE[method]}")
    get_method_class(method)
    search = load_search_space(space_path(method, space), method)  # a malformed file stops us here
    cfg = build_dataclass(TrainConfig, {**(overrides or {}), "method": method, "seed": train_seed}, where="tune")
    out = out or Path("runs") / f"tune-{method}"
    req = TuneRequest(method, search, cfg, out, samples, objective, scheduler, grace_period, reduction_factor,
                      max_concurrent, seed, include_default, Resources(cpus_per_trial, gpus_per_trial), storage,
                      max_failures, MaskingCheck(masking_top_k, masking_threshold, masking_n))
    req.validate()
    splits = load_splits(cfg.dataset, cfg.data_dir)
    if fresh and out.exists():
        shutil.rmtree(out)
    console.print(f"tune {method} on {splits.info.name}: {samples} trials, objective {objective}, "
                  f"{req.scheduler_name}, {cfg.epochs} epochs, space {search.path} -> {out}")

    def label(config: dict) -> str:
        vals = search.searched(config)
        return " ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                        for k, v in vals.items())[:60] or "trial"

    with ray_cluster(address) as ray_info:
        if ray_info.get("dashboard_url"):
            console.print(f"Ray dashboard: {ray_info['dashboard_url']}")
        with TrialsDisplay(samples, cfg.epochs, label):
            outcome = run_tune(req, splits, callbacks=[TuneProgressCallback()])

    console.print(f"Optuna study: optuna-dashboard {outcome.study}")
    if outcome.unfinished:
        raise Interrupted(f"{outcome.unfinished} trial(s) unfinished")
    short = {d.key: d.key.split(".", 1)[1] for d in search.dims}
    cols = ["trial_no", "status", *short.values(), "epochs_run", "val_clean_acc", "val_robust_acc", "val_tradeoff",
            "masking_gap"]
    shown = sorted(outcome.rows, key=lambda r: -(r["val_tradeoff"] if math.isfinite(r["val_tradeoff"]) else -1))
    table = [{**{c: r.get(c) for c in cols}, **{v: r.get(k) for k, v in short.items()},
              "status": r["status"] + (" MASKED" if r["masking_flag"] else "") + (" best" if r["best"] else "")}
             for r in shown]
    console.print(rich_table(table, cols, title=f"tune {method}: trials (validation split)"))
    saved = 1 - outcome.epochs_run / max(1, outcome.epochs_full)
    console.print(f"ASHA/early stop: {outcome.stopped} of {len(outcome.rows)} trials stopped early; "
                  f"{outcome.epochs_run} of {outcome.epochs_full} epochs trained ({saved:.0%} saved, about "
                  f"{(outcome.epochs_full - outcome.epochs_run) * outcome.seconds_per_epoch:.0f} trial-seconds)")
    if outcome.pareto:
        console.print(rich_table(sorted(outcome.pareto, key=lambda r: -r["val_clean_acc"]),
                                 ["trial_id", "val_clean_acc", "val_robust_acc", "val_tradeoff", "masking_flag"],
                                 title="Pareto front (clean vs robust, validation)"))
    flagged = [r["trial_id"] for r in outcome.rows if r["masking_flag"]]
    if flagged:
        console.print(f"[red]gradient masking suspected (excluded from best): {', '.join(flagged)}[/]")
    console.print(f"wrote {outcome.table}")
    if outcome.best is None:
        console.print("[red]no unflagged finished trial among the top ones: no best.json[/]")
        sys.exit(1)
    console.print(f"best trial {outcome.best['trial_id']}: val_tradeoff {outcome.best['val_tradeoff']:.4f}; "
                  f"wrote {outcome.best_json} (raydefense train {method} --config {outcome.best_json})")
    if then_evaluate:
        from raydefense.cli.ui import RichFitProgress, make_progress
        from raydefense.tune import retrain_and_evaluate

        with make_progress() as progress:
            rows, result = retrain_and_evaluate(outcome.best_json, out / "best_model", eval_attacks, eval_n,
                                                RichFitProgress(progress))
        console.print(rich_table(rows, ["attack", "eps_label", "accuracy", "n"],
                                 title=f"best configuration re-trained: test split ({out / 'best_model'})"))
        if result.flags:
            console.print("[red]sanity flags: " + "; ".join(escape(f) for f in result.flags) + "[/]")
    if outcome.errors:
        console.print("[red]failed trials:[/]\n  " + "\n  ".join(escape(e) for e in outcome.errors))
        sys.exit(1)
