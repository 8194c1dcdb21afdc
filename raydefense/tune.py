"""``raydefense tune <method>``: an Optuna search (TPE, seeded) over a method's search space on Ray Tune.

Each trial is an ordinary ``train_trial`` (``fit`` in a Tune trial, one report and checkpoint per
epoch, resumable). The objective is measured on the VALIDATION split: ``val_tradeoff`` = mean of
clean and PGD accuracy (``robust``: PGD accuracy alone; ``pareto``: both, multi-objective). ASHA
stops weak trials at its rungs (``training_iteration`` = epochs reported; the trial's closing
report is one more, hence ``max_t = epochs + 1``).

Layout of ``<out>``: ``request.json`` (what was asked; a re-run must match it to resume),
``tune/`` (Ray's experiment state, the searcher's in-memory Optuna study, per-trial checkpoints),
``optuna.db`` (a persistent Optuna study mirrored from Tune's trials, idempotently, keyed by the
Tune trial id: ``optuna-dashboard sqlite:///<out>/optuna.db``), ``trials.parquet`` (one row per
trial, written only once every trial has ended), ``checkpoints/<trial>/`` (the top trials'
checkpoints, checked for gradient masking), ``best.json`` (TrainConfig of the best unflagged
trial: ``raydefense train <method> --config <out>/best.json``).

Guard against gradient masking: the top trials' checkpoints are attacked on a validation subset by
the objective's PGD and by a stronger attack (PGD-50 with restarts, per-sample worst case); a gap
above ``masking_threshold`` flags the trial and excludes it from "best".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raydefense.config import PLACEMENT_FIELDS, TrainConfig
from raydefense.data import Splits
from raydefense.distributed.experiment import (ExperimentSpec, Resources, check_storage, run_experiment, storage_uri,
                                               trial_configs)
from raydefense.distributed.trial import merged_train_config
from raydefense.errors import UserError
from raydefense.report import write_parquet
from raydefense.search_space import SearchSpace

log = logging.getLogger(__name__)

EXPERIMENT = "tune"
OBJECTIVES = {"tradeoff": "val_tradeoff", "robust": "val_robust_acc", "pareto": ("val_clean_acc", "val_robust_acc")}
STUDY_FILE = "optuna.db"


@dataclass
class MaskingCheck:
    top_k: int = 3  # how many of the best trials are attacked harder
    threshold: float = 0.10  # flag when objective-PGD accuracy exceeds the strong attack's by more
    n: int = 256  # validation samples attacked
    steps: int = 50
    restarts: int = 3


@dataclass
class TuneRequest:
    method: str
    space: SearchSpace
    train: TrainConfig
    out: Path
    samples: int = 16
    objective: str = "tradeoff"
    scheduler: str | None = None  # None: asha for a scalar objective, fifo for pareto
    grace_period: int = 2
    reduction_factor: int = 2
    max_concurrent: int = 2
    seed: int = 0
    include_default: bool = True  # the method's default configuration is the first trial
    resources: Resources = field(default_factory=Resources)
    storage: str | None = None
    max_failures: int = 2
    masking: MaskingCheck = field(default_factory=MaskingCheck)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        sched = self.scheduler_name
        if sched not in ("asha", "fifo"):
            raise UserError(f"--scheduler must be asha or fifo, got {sched!r}")
        if sched == "asha" and self.objective == "pareto":
            raise UserError("--objective pareto is multi-objective: ASHA needs one scalar; use --scheduler fifo")
        for name in ("samples", "max_concurrent", "grace_period"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor < 2:
            raise UserError(f"--reduction-factor must be >= 2, got {self.reduction_factor}")
        if sched == "asha" and self.grace_period > self.train.epochs:
            raise UserError(f"--grace-period ({self.grace_period}) exceeds --epochs ({self.train.epochs})")
        self.resources.validate()
        check_storage(self.storage)  # before Ray starts, as `sweep afs` checks it

    @property
    def scheduler_name(self) -> str:
        return self.scheduler or ("fifo" if self.objective == "pareto" else "asha")

    @property
    def metric(self):
        return OBJECTIVES[self.objective]


@dataclass
class TuneOutcome:
    rows: list[dict[str, Any]]
    unfinished: int
    errors: list[str]
    best: dict[str, Any] | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0
    epochs_full: int = 0
    stopped: int = 0
    seconds_per_epoch: float = math.nan
    table: Path | None = None
    best_json: Path | None = None
    study: str | None = None


def study_url(out: Path) -> str:
    return f"sqlite:///{(Path(out) / STUDY_FILE).resolve()}"


def study_name(req: TuneRequest) -> str:
    return f"raydefense-{req.method}-{req.objective}"


# ---------------------------------------------------------------------------------- experiment
def tune_spec(req: TuneRequest, callbacks: list | None = None) -> ExperimentSpec:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    req.validate()
    train = req.train.replace(method=req.method).to_dict()
    multi = req.objective == "pareto"
    metric = list(req.metric) if multi else req.metric
    mode = ["max", "max"] if multi else "max"
    points = [req.space.default_point(req.method, req.train)] if req.include_default else None
    # The searcher's study lives in memory (Tune checkpoints it); Optuna's INFO line "A new study created
    # in memory" would read as if optuna.db were not used, so only warnings are shown.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(space=req.space.sample, metric=metric, mode=mode,
                            sampler=optuna.samplers.TPESampler(seed=req.seed), points_to_evaluate=points or None)
    scheduler = (ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode,
                               max_t=req.train.epochs + 1, grace_period=req.grace_period,
                               reduction_factor=req.reduction_factor)
                 if req.scheduler_name == "asha" else FIFOScheduler())
    tune_config = tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=req.max_concurrent),
                                  scheduler=scheduler, num_samples=req.samples)
    param_space = {"train": train, "cpus_per_trial": req.resources.cpus_per_trial,
                   "gpus_per_trial": req.resources.gpus_per_trial}
    fingerprint = {"kind": "tune", "method": req.method, "dataset": req.train.dataset, "samples": req.samples,
                   "objective": req.objective, "scheduler": req.scheduler_name, "grace_period": req.grace_period,
                   "reduction_factor": req.reduction_factor, "seed": req.seed, "include_default": req.include_default,
                   "space": {"dims": [dataclasses.asdict(d) for d in req.space.dims], "fixed": req.space.fixed},
                   "train": {k: v for k, v in train.items() if k not in (*PLACEMENT_FIELDS, "data_dir")}}
    return ExperimentSpec(EXPERIMENT, storage_uri(req.out, req.storage), param_space, req.resources,
                          req.max_failures, tune_config=tune_config, callbacks=callbacks or [],
                          fingerprint=json.loads(json.dumps(fingerprint, default=list)))


def run_tune(req: TuneRequest, splits: Splits, callbacks: list | None = None) -> TuneOutcome:
    """Run (or resume) the search, then mirror it into optuna.db and write the tables."""
    spec = tune_spec(req, callbacks)
    grid = run_experiment(spec, Path(req.out), {"splits": splits})
    return collect(grid, req, splits)


# ---------------------------------------------------------------------------------- results
def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    parts = Path(result.path).name.split("_")  # train_trial_<exp>_<nnnnn>_...
    return "_".join(parts[2:4]) if len(parts) >= 4 else Path(result.path).name


def _trial_no(result) -> int:
    """Tune's 1-based creation index, from the trial directory name train_trial_<id>_<n>_..."""
    parts = Path(result.path).name.split("_")
    try:
        return int(parts[3])
    except (IndexError, ValueError):
        return 0


def trial_rows(grid, req: TuneRequest) -> tuple[list[dict], list]:
    from raydefense.methods import get_method_class

    select = getattr(get_method_class(req.method), "selection_metric", "val_robust_acc")
    rows, results = [], []
    for result, config, tune_status in zip(grid, trial_configs(grid), _statuses(grid)):
        m = result.metrics or {}
        searched = req.space.searched(config)
        done = bool(m.get("done_training"))
        history = _history(result)
        epochs = int(m.get("epochs_run", 0) if done else m.get("epoch", 0))
        metrics = {k: m.get(k, math.nan) for k in ("val_clean_acc", "val_robust_acc", "val_tradeoff")}
        best_epoch = m.get("best_epoch")
        if result.error is not None:
            status = "error"
        elif done:
            status = "ok"
        elif tune_status == "TERMINATED":
            # stopped by ASHA: at a rung before its last epoch ("stopped"), or at a rung on its last
            # epoch, which only cost it the closing report ("ok": it trained fully)
            status = "ok" if epochs >= req.train.epochs else "stopped"
        else:
            status = "unfinished"
        if not done and history:  # the best epoch so far, chosen as fit chooses (its model.pt)
            top = max(history, key=lambda h: (h.get(select, -1), h.get("val_clean_acc", -1)))
            metrics = {k: top.get(k, math.nan) for k in metrics}
            best_epoch = int(top.get("epoch", 0))
        row = {"trial_no": _trial_no(result), "trial_id": _trial_id(result), "status": status, **searched,
               "params": json.dumps(searched, sort_keys=True), **metrics, "best_epoch": best_epoch,
               "epochs_run": epochs, "wall_time_s": m.get("time_total_s"),
               "error": str(result.error).strip().splitlines()[-1][:500] if result.error is not None else None,
               "history": json.dumps(history), "checkpoint": None, "masking_checked": False,
               "masking_pgd_acc": math.nan, "masking_strong_acc": math.nan, "masking_gap": math.nan,
               "masking_flag": False, "pareto": False, "best": False}
        rows.append(row)
        results.append(result)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["trial_no"], rows[i]["trial_id"]))
    return [rows[i] for i in order], [results[i] for i in order]


def _statuses(grid) -> list[str]:
    """Tune's state of each trial (TERMINATED, ERROR, RUNNING, PENDING...) in the ResultGrid's order,
    as the experiment's last saved state records it: a trial that ended without its closing report
    was stopped by the scheduler only if TERMINATED there.

    Not the in-memory state: on Ctrl-C, Tune saves the state it resumes from and then stops every
    live trial, marking it TERMINATED in memory, so an interrupted trial would look like one ASHA
    stopped (and a search whose every trial had started would look finished).
    """
    from ray.tune import ExperimentAnalysis

    try:
        trials = grid._experiment_analysis.trials
    except AttributeError:  # pragma: no cover - a future ResultGrid without it: treat as ended
        return ["TERMINATED"] * len(grid)
    try:
        saved = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem).trials
        status = {t.trial_id: str(t.status) for t in saved}
    except Exception as exc:  # noqa: BLE001 - no saved state to read: fall back to memory
        log.warning("cannot read the saved experiment state (%s); using Tune's in-memory trial states", exc)
        status = {}
    return [status.get(t.trial_id, str(t.status)) for t in trials]


def _history(result) -> list[dict]:
    """The trial's per-epoch validation metrics (from Tune's progress log)."""
    try:
        df = result.metrics_dataframe
    except Exception:  # noqa: BLE001 - a trial that never reported has none
        return []
    if df is None or "val_tradeoff" not in df:
        return []
    df = df[df["done_training"] == False] if "done_training" in df else df  # noqa: E712 - pandas mask
    keep = [c for c in ("epoch", "val_clean_acc", "val_robust_acc", "val_tradeoff") if c in df]
    return [{k: float(v) for k, v in rec.items()} for rec in df[keep].to_dict("records")]


def pareto_front(rows: list[dict], keys: tuple[str, str] = ("val_clean_acc", "val_robust_acc")) -> list[dict]:
    """Rows that no other row dominates (>= on every key and > on one); all rows maximize."""
    def dominates(a: dict, b: dict) -> bool:
        return all(a[k] >= b[k] for k in keys) and any(a[k] > b[k] for k in keys)

    return [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]


def collect(grid, req: TuneRequest, splits: Splits) -> TuneOutcome:
    rows, results = trial_rows(grid, req)
    # trials not even created yet (an interrupted search) count as unfinished too
    unfinished = sum(r["status"] == "unfinished" for r in rows) + max(0, req.samples - len(rows))
    errors = [f"trial {r['trial_id']}: {r['error']}" for r in rows if r["status"] == "error"]
    done_epochs = sum(r["epochs_run"] for r in rows)
    times = [(r["wall_time_s"], r["epochs_run"]) for r in rows if r["wall_time_s"] and r["epochs_run"]]
    outcome = TuneOutcome(rows, unfinished, errors, epochs_run=done_epochs, epochs_full=len(rows) * req.train.epochs,
                          stopped=sum(r["status"] == "stopped" for r in rows),
                          seconds_per_epoch=sum(t for t, _ in times) / max(1, sum(e for _, e in times)))
    outcome.study = sync_study(req, rows)
    if unfinished:
        return outcome  # no table and no best: an interrupted search must not look complete

    ok = [r for r in rows if r["status"] == "ok"]
    if req.objective == "pareto":
        front = pareto_front(ok)
        for r in front:
            r["pareto"] = True
        outcome.pareto = front
        ranked = sorted(front, key=lambda r: -r["val_tradeoff"])
    else:
        ranked = sorted(ok, key=lambda r: -r[req.metric])
    by_id = {r["trial_id"]: res for r, res in zip(rows, results)}
    ckpts = Path(req.out) / "checkpoints"
    for row in ranked[:req.masking.top_k]:
        dest = ckpts / row["trial_id"]
        if dest.exists():
            shutil.rmtree(dest)
        by_id[row["trial_id"]].checkpoint.to_directory(str(dest))
        for leftover in ("trainer_state.pt", "post.json"):
            (dest / leftover).unlink(missing_ok=True)
        row["checkpoint"] = str(dest.resolve())  # the trial's best epoch (fit's model.pt)
        row.update(masking_check(dest, splits, req.train, req.masking))
    best = next((r for r in ranked[:req.masking.top_k] if not r["masking_flag"]), None)
    if best is not None:
        best["best"] = True
        outcome.best = best
        cfg = merged_train_config({**by_id[best["trial_id"]].config})
        cfg = {k: v for k, v in cfg.items() if k not in PLACEMENT_FIELDS}
        path = Path(req.out) / "best.json"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        outcome.best_json = path
    meta = {"method": req.method, "objective": req.objective, "scheduler": req.scheduler_name,
            "epochs_run": outcome.epochs_run, "epochs_full": outcome.epochs_full, "stopped": outcome.stopped,
            "best_trial": best["trial_id"] if best else None, "study": outcome.study}
    outcome.table = write_parquet(rows, Path(req.out) / "trials.parquet", metadata=meta)
    return outcome


# ---------------------------------------------------------------------------------- masking
def masking_check(ckpt: Path, splits: Splits, train: TrainConfig, check: MaskingCheck) -> dict[str, Any]:
    """Objective-PGD vs a stronger attack on a validation subset; a large gap means masked gradients."""
    from raydefense import load_model
    from raydefense.attacks import pgd_ce_until_fooled

    model = load_model(ckpt, "cpu")
    x, y = splits.val.tensors()
    x, y = x[:check.n], y[:check.n]
    eps = splits.info.standard_eps if train.eps is None else train.eps
    gen = torch.Generator().manual_seed(0)

    def correct_under(steps: int) -> torch.Tensor:
        xa = pgd_ce_until_fooled(model, x, y, eps, steps, eps / 4, generator=gen)
        with torch.no_grad():
            return model(xa).argmax(1) == y

    weak = correct_under(train.val_attack_steps)
    strong = weak.clone()
    for _ in range(check.restarts):  # per-sample worst case over restarts (and the weak attack)
        strong &= correct_under(check.steps)
    pgd_acc, strong_acc = float(weak.float().mean()), float(strong.float().mean())
    gap = pgd_acc - strong_acc
    log.info("masking check %s: PGD-%d %.3f vs PGD-%dx%d %.3f (gap %.3f)", ckpt.name, train.val_attack_steps,
             pgd_acc, check.steps, check.restarts, strong_acc, gap)
    return {"masking_checked": True, "masking_pgd_acc": pgd_acc, "masking_strong_acc": strong_acc,
            "masking_gap": gap, "masking_flag": gap > check.threshold}


# ---------------------------------------------------------------------------------- optuna.db
def sync_study(req: TuneRequest, rows: list[dict]) -> str:
    """Mirror every ended Tune trial into the persistent study, once (keyed by the Tune trial id).

    Tune's searcher keeps its own (checkpointed) in-memory study; this one is derived from Tune's
    results, so after any interruption and resume it holds exactly the trials Tune has ended.
    """
    import optuna

    url = study_url(req.out)
    multi = req.objective == "pareto"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=url, study_name=study_name(req), load_if_exists=True,
                                **({"directions": ["maximize", "maximize"]} if multi else {"direction": "maximize"}))
    known = {t.user_attrs.get("tune_trial_id") for t in study.get_trials(deepcopy=False)}
    State = optuna.trial.TrialState
    for row in rows:
        if row["status"] == "unfinished" or row["trial_id"] in known:
            continue
        params = json.loads(row["params"])
        history = json.loads(row["history"])
        kw: dict[str, Any] = {}
        if row["status"] == "ok":
            kw["state"] = State.COMPLETE
            if multi:
                kw["values"] = [row[k] for k in req.metric]
            else:
                kw["value"] = row[req.metric]
        else:
            kw["state"] = State.PRUNED if row["status"] == "stopped" else State.FAIL
        if not multi:
            key = req.metric
            kw["intermediate_values"] = {int(h["epoch"]): h[key] for h in history if key in h and "epoch" in h}
        attrs = {"tune_trial_id": row["trial_id"], "status": row["status"], "epochs_run": row["epochs_run"],
                 **{k: row[k] for k in ("val_clean_acc", "val_robust_acc", "val_tradeoff")
                    if isinstance(row[k], float) and math.isfinite(row[k])}}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=req.space.distributions(params),
                                                  user_attrs=attrs, **kw))
    return url


# ---------------------------------------------------------------------------------- re-train
def retrain_and_evaluate(best_json: Path, out: Path, attacks: str, n: int | None, progress=None):
    """Train the best configuration from scratch into ``out`` and evaluate it on the TEST split."""
    from raydefense.evaluate import evaluate_checkpoint
    from raydefense.train import fit

    cfg = TrainConfig.from_dict(json.loads(Path(best_json).read_text()))
    fit(cfg, out, progress=progress)
    rows, result, _ = evaluate_checkpoint(out, attacks=attacks, n=n, split="test")
    return rows, result
