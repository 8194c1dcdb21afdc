"""``raydefense sweep afs``: the AFS extractors, one PGD-AT training per budget, in parallel on Ray."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from raydefense.cli import app
from raydefense.cli.options import dataclass_options
from raydefense.config import PLACEMENT_FIELDS, TrainConfig, build_dataclass
from raydefense.errors import Interrupted, UserError

sweep_app = typer.Typer(no_args_is_help=True, help="Train many models in parallel on Ray Tune.")
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("afs")
@dataclass_options(TrainConfig, exclude=("method", "eps", "seed", *PLACEMENT_FIELDS))
def sweep_afs(
    budgets: str = typer.Option("0..9", help="training budgets k (eps = k x eps_unit): 0..9, 3..8, 0,2,4, 0..9:2"),
    seeds: str = typer.Option("0", help="repeat every budget for these seeds: 0,1,2"),
    eps_unit: Optional[str] = typer.Option(None, help="one budget step, e.g. 1/255 [default: standard eps / 8]"),
    eval_eps: Optional[str] = typer.Option(None, help="budget for PGD and Delta_z [default: standard eps]"),
    out: Path = typer.Option(Path("runs/afs"), help="sweep directory (resumed if it holds this sweep)"),
    cpus_per_trial: float = typer.Option(1.0, help="CPUs reserved per trial"),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs per trial; fractions such as 0.25 pack trials on a GPU"),
    workers_per_trial: int = typer.Option(1, help="> 1: each trial is a Ray Train TorchTrainer of N data-parallel "
                                          "workers, each with --cpus-per-trial / --gpus-per-trial"),
    address: Optional[str] = typer.Option(None, help="join this Ray cluster (host:port or auto) [env RAY_ADDRESS]"),
    storage: Optional[str] = typer.Option(None, help="results location: a path or a URI Ray storage accepts (s3://...)"),
    max_failures: int = typer.Option(2, help="retries of a failed trial (e.g. its node died) from its last checkpoint; -1: no limit"),
    dashboard_host: str = typer.Option("127.0.0.1", help="bind the Ray dashboard here when Ray starts locally (0.0.0.0: reachable from the network)"),
    preset: Optional[str] = typer.Option(None, help="the extractors' settings as defaults that flags override: "
                                         "afs-extractor, afs-code-extractor, rice2020-pgd-at (docs/presets.md)"),
    fresh: bool = typer.Option(False, help="delete OUT first instead of resuming"),
    overrides: dict = None,
) -> None:
    """Train one PGD-AT extractor per budget (x seed) in parallel; writes OUT/sweep.parquet."""
    from raydefense.budgets import parse_budgets, parse_seeds

    budget_list, seed_list = parse_budgets(budgets), parse_seeds(seeds)  # bad input fails before torch loads
    if max_failures < -1:
        raise UserError(f"--max-failures must be -1 (no limit) or >= 0, got {max_failures}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")

    from raydefense.afs import select_concave
    from raydefense.cli.tune_progress import TuneProgressCallback
    from raydefense.cli.ui import TrialsDisplay, console, print_ray_info
    from raydefense.data import format_eps, load_splits, parse_eps
    from raydefense.distributed.cluster import check_dashboard_host, ray_cluster
    from raydefense.distributed.experiment import Resources, check_storage, delete_storage, storage_uri
    from raydefense.report import rich_table
    from raydefense.sweep import SweepRequest, mean_by_budget, run_afs_sweep

    check_storage(storage)
    dashboard_host = check_dashboard_host(dashboard_host)
    from raydefense.presets import preset_values
    from raydefense.warm_start import absolute_init_from

    cfg = absolute_init_from(build_dataclass(
        TrainConfig, {**preset_values(preset, "pgd-at"), **(overrides or {}), "method": "pgd-at"}, where="sweep afs"))
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.download)
    resources = Resources(cpus_per_trial, gpus_per_trial, workers_per_trial)
    resources.validate()
    req = SweepRequest(budget_list, seed_list, cfg, out, parse_eps(eps_unit) if eps_unit else None,
                       parse_eps(eval_eps) if eval_eps else None, resources, storage, max_failures)
    if fresh:
        if out.exists():
            shutil.rmtree(out)
        delete_storage(out, storage)
    unit = req.eps_unit if req.eps_unit is not None else splits.info.eps_unit
    console.print(f"AFS sweep on {splits.info.name}: budgets {', '.join(f'{b:g}' for b in budget_list)} "
                  f"(eps_unit {format_eps(unit)}), seeds {seed_list}, {cfg.epochs} epochs, -> {out}")

    def label(config: dict) -> str:
        return f"budget {config['point']['budget']:g} seed {config['train.seed']}"

    with ray_cluster(address, dashboard=True, dashboard_host=dashboard_host) as ray_info:
        print_ray_info(ray_info, storage_uri(out, storage))
        with TrialsDisplay(len(budget_list) * len(seed_list), cfg.epochs, label):
            outcome = run_afs_sweep(req, splits, callbacks=[TuneProgressCallback()])

    if outcome.errors:
        console.print(f"[red]{len(outcome.errors)} trial(s) failed after {max_failures} retries:[/]\n  "
                      + "\n  ".join(escape(e) for e in outcome.errors))
    if outcome.unfinished:
        raise Interrupted(f"{outcome.unfinished} trial(s) unfinished")
    table = mean_by_budget(outcome.rows)
    if table:  # else every trial failed: the errors above say why
        console.print(rich_table(table, ["budget", "eps", "seeds", "clean_acc", "pgd10_acc", "pgd20_acc", "delta_z"],
                                 title=f"Table 1: AFS extractors on {splits.info.name} (validation split)"))
    if len(table) >= 3:
        sel = select_concave([r["budget"] for r in table], [r["delta_z"] for r in table])
        console.print(f"selection rule (Delta_z concave in the budget) keeps: {', '.join(f'{b:g}' for b in sel.kept)}")
    console.print(f"wrote {outcome.table}" + (f" and {outcome.plot}" if outcome.plot else " (every trial failed: no plot)"))
    if outcome.errors:
        console.print("[red]not every trial finished[/]: run the same command again to retry the failed ones")
        sys.exit(1)
