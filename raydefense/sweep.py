"""``raydefense sweep afs``: one PGD-AT extractor per (budget, seed), trained in parallel on Ray Tune.

Layout of ``<out>``: ``request.json`` (what was asked; a re-run must match it to resume),
``tune/`` (Ray's experiment state and per-trial checkpoints), ``extractors/b<k>_s<seed>/`` (each
extractor's best checkpoint: a normal checkpoint directory), ``sweep.parquet`` (contract columns
plus seed, wall time, status) and ``sweep.png``. ``sweep.parquet`` is written only once every
trial has ended, so an interrupted sweep never leaves a table that looks complete.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydefense.config import PLACEMENT_FIELDS, TrainConfig
from raydefense.data import Splits, format_eps
from raydefense.distributed.experiment import ExperimentSpec, Resources, run_experiment, storage_uri, trial_configs
from raydefense.report import write_parquet

log = logging.getLogger(__name__)

EXPERIMENT = "tune"
SWEEP_COLUMNS = ("budget", "eps", "clean_acc", "pgd10_acc", "pgd20_acc", "delta_z", "checkpoint")


@dataclass
class SweepRequest:
    budgets: list[float]
    seeds: list[int]
    train: TrainConfig
    out: Path
    eps_unit: float | None = None  # None: the dataset's standard eps / 8
    eval_eps: float | None = None  # None: the dataset's standard eps
    resources: Resources = field(default_factory=Resources)
    storage: str | None = None
    max_failures: int = 2


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]
    unfinished: int
    errors: list[str]
    table: Path | None = None
    plot: Path | None = None


def _budget_key(budget: float) -> str:
    return f"{budget:g}".replace(".", "p")


def afs_spec(req: SweepRequest, splits: Splits, callbacks: list | None = None) -> ExperimentSpec:
    from ray import tune

    info = splits.info
    unit = req.eps_unit if req.eps_unit is not None else info.eps_unit
    eval_eps = req.eval_eps if req.eval_eps is not None else info.standard_eps
    train = req.train.replace(method="pgd-at", eps=None, seed=0).to_dict()
    points = [{"budget": b, "train.eps": b * unit} for b in req.budgets]
    param_space = {
        "train": train,
        "point": tune.grid_search(points),
        "train.seed": tune.grid_search(list(req.seeds)),
        "post": "raydefense.afs:extractor_report",
        "post_options": {"eval_eps": eval_eps},
        "cpus_per_trial": req.resources.cpus_per_trial,
        "gpus_per_trial": req.resources.gpus_per_trial,
        "workers_per_trial": req.resources.workers_per_trial,
    }
    fingerprint = {"kind": "afs-sweep", "dataset": info.name, "budgets": list(req.budgets), "seeds": list(req.seeds),
                   "eps_unit": unit, "eval_eps": eval_eps,
                   "train": {k: v for k, v in train.items() if k not in (*PLACEMENT_FIELDS, "data_dir", "download")}}
    return ExperimentSpec(EXPERIMENT, storage_uri(req.out, req.storage), param_space, req.resources,
                          req.max_failures, callbacks=callbacks or [], fingerprint=fingerprint)


def run_afs_sweep(req: SweepRequest, splits: Splits, callbacks: list | None = None) -> SweepOutcome:
    """Train (or resume) every trial, then collect extractors, table and plot."""
    spec = afs_spec(req, splits, callbacks)
    grid = run_experiment(spec, Path(req.out), {"splits": splits})
    return collect(grid, req, splits)


def collect(grid, req: SweepRequest, splits: Splits) -> SweepOutcome:
    info = splits.info
    unit = req.eps_unit if req.eps_unit is not None else info.eps_unit
    rows, errors, unfinished = [], [], 0
    extractors = Path(req.out) / "extractors"
    for result, cfg in zip(grid, trial_configs(grid)):
        budget, seed = cfg["point"]["budget"], cfg["train.seed"]
        m = result.metrics or {}
        row = {"budget": budget, "eps": budget * unit, "eps_label": format_eps(budget * unit), "seed": seed,
               "clean_acc": math.nan, "pgd10_acc": math.nan, "pgd20_acc": math.nan, "delta_z": math.nan,
               "checkpoint": None, "best_epoch": None, "epochs_run": None, "wall_time_s": m.get("time_total_s"),
               "status": "ok", "error": None}
        if result.error is not None:
            row.update(status="error", error=str(result.error).strip().splitlines()[-1][:500])
            errors.append(f"budget {budget:g} seed {seed}: {row['error']}")
        elif not m.get("done_training"):
            unfinished += 1
            row["status"] = "unfinished"
        else:
            dest = extractors / f"b{_budget_key(budget)}_s{seed}"
            if dest.exists():
                shutil.rmtree(dest)
            result.checkpoint.to_directory(str(dest))
            for leftover in ("trainer_state.pt", "post.json"):
                (dest / leftover).unlink(missing_ok=True)
            row.update({k: m[k] for k in ("clean_acc", "pgd10_acc", "pgd20_acc", "delta_z", "best_epoch", "epochs_run")},
                       checkpoint=str(dest.resolve()), eval_eps=m.get("eval_eps"))
        rows.append(row)
    rows.sort(key=lambda r: (r["budget"], r["seed"]))
    outcome = SweepOutcome(rows, unfinished, errors)
    if unfinished:
        return outcome  # no table: an interrupted sweep must not look complete
    outcome.table = write_parquet(rows, Path(req.out) / "sweep.parquet",
                                  metadata={"dataset": info.name, "eps_unit": unit, "request": spec_summary(req)})
    outcome.plot = plot_sweep(rows, Path(req.out) / "sweep.png", info.name)
    return outcome


def spec_summary(req: SweepRequest) -> dict:
    return {"budgets": list(req.budgets), "seeds": list(req.seeds), "epochs": req.train.epochs,
            "dataset": req.train.dataset}


def mean_by_budget(rows: list[dict]) -> list[dict]:
    """Average the seeds of each budget (Table 1 shows one line per budget)."""
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        group = [r for r in rows if r["budget"] == budget and r["status"] == "ok"]
        if not group:
            continue
        avg = {k: sum(r[k] for r in group) / len(group) for k in ("clean_acc", "pgd10_acc", "pgd20_acc", "delta_z")}
        out.append({"budget": budget, "eps": group[0]["eps_label"], "seeds": len(group), **avg})
    return out


def plot_sweep(rows: list[dict], path: Path, dataset: str) -> Path | None:
    from raydefense.plots import sweep_plot

    table = mean_by_budget(rows)
    if not table:
        return None
    eval_eps = next((r.get("eval_eps") for r in rows if r.get("eval_eps") is not None), None)
    return sweep_plot([r["budget"] for r in table], [r["clean_acc"] for r in table], [r["pgd20_acc"] for r in table],
                      [r["delta_z"] for r in table], path, f"AFS extractors on {dataset}",
                      format_eps(eval_eps) if eval_eps is not None else "standard eps")
