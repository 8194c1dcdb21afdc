"""`raydefense tune`: search-space files, an ASHA search end to end, resume, the Pareto mode."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from raydefense.config import TrainConfig
from raydefense.errors import UserError
from raydefense.search_space import SPACES_DIR, load_search_space, parse_search_space
from raydefense.tune import MaskingCheck, TuneRequest, pareto_front, run_tune, study_name
from raydefense.cli import INTERRUPTED
from helpers import interrupt_at, unbuffered_env

TINY = dict(attack_steps=2, val_attack_steps=2)
NO_MASKING = MaskingCheck(top_k=2, threshold=1.0, n=32, steps=3, restarts=1)


# ------------------------------------------------------------------------------ search spaces
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_every_shipped_space_parses_and_samples():
    files = sorted(SPACES_DIR.glob("*.yaml"))
    names = {p.stem for p in files}
    assert {"afs", "afd-dcgan", "afd-wgan", "rfd", "ldat", "er", "er-", "er-trades", "trades", "mart"} <= names
    for path in files:
        space = load_search_space(path, path.stem)
        params = space.sample(optuna.create_study().ask())
        assert set(params) >= {d.key for d in space.dims if not d.when}


@pytest.mark.parametrize("body, key, what", [
    ("dimensions: {options.beta: {type: float, low: 2, high: 1}}", "options.beta", "must be below"),
    ("dimensions: {options.beta: {type: log-float, low: 0, high: 1}}", "options.beta", "low > 0"),
    ("dimensions: {options.beta: {type: gaussian, low: 0, high: 1}}", "options.beta", "type must be one of"),
    ("dimensions: {options.bta: {type: float, low: 0, high: 1}}", "options.bta", "no option 'bta'"),
    ("dimensions: {train.lrr: {type: float, low: 0, high: 1}}", "train.lrr", "no field 'lrr'"),
    ("dimensions: {train.epochs: {type: float, low: 1, high: 3}}", "train.epochs", "use type int"),
    ("dimensions: {train.lr_schedule: {type: categorical, choices: [cosine, linear]}}", "train.lr_schedule",
     "must be one of"),
    ("dimensions: {train.device: {type: categorical, choices: [cpu]}}", "train.device", "cannot be searched"),
    ("dimensions: {train.attack_shards: {type: int, low: 1, high: 2}}", "train.attack_shards", "cannot be searched"),
    ("dimensions: {beta: {type: float, low: 0, high: 1}}", "beta", "train.<TrainConfig field>"),
    ("dimensions: {options.beta: {type: float, low: 0, hi: 1}}", "options.beta", "unknown field 'hi'"),
    ("dimensions: {options.beta: {type: categorical, choices: []}}", "options.beta", "non-empty list"),
    ("dimensions: {options.beta: {type: float, low: 1, high: 2, when: {train.lr: 1}}}", "options.beta",
     "not a dimension defined above"),
    ("fixed: {options.beta: 1}\ndimensions: {options.beta: {type: float, low: 1, high: 2}}", "options.beta",
     "both fixed and searched"),
    ("fixed: {options.beta: abc}\ndimensions: {train.lr: {type: float, low: 0.1, high: 0.2}}", "options.beta",
     "must be float"),
    ("method: mart\ndimensions: {options.beta: {type: float, low: 1, high: 2}}", "method", "not 'trades'"),
    ("dimension: {}", "dimension", "unknown top-level key"),
    ("dimensions: [1, 2]", "dimensions", "non-empty mapping"),
])
def test_malformed_space_names_file_key_and_problem(tmp_path, body, key, what):
    path = _write(tmp_path, body)
    with pytest.raises(UserError) as err:
        load_search_space(path, "trades")
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}: ") and what in msg, msg


def test_unregistered_method_skips_option_names_but_not_types(tmp_path):
    ok = _write(tmp_path, "dimensions: {options.anything: {type: float, low: 0, high: 1}}")
    assert load_search_space(ok, "not-merged-yet").dims[0].key == "options.anything"
    bad = _write(tmp_path, "dimensions: {options.anything: {type: float, low: 1, high: 0}}")
    with pytest.raises(UserError, match="must be below"):
        load_search_space(bad, "not-merged-yet")


def test_conditional_dimension_is_sampled_only_when_active():
    """An ldat-like space: gamma exists only for the boundary attack, warm-up only for moving schedules."""
    space = parse_search_space({"dimensions": {
        "options.schedule": {"type": "categorical", "choices": ["constant", "linear-up", "linear-down"]},
        "options.warmup": {"type": "int", "low": 1, "high": 5, "when": {"options.schedule": ["linear-up", "linear-down"]}},
        "options.attack": {"type": "categorical", "choices": ["boundary", "pgd"]},
        "options.gamma": {"type": "float", "low": 0.05, "high": 0.5, "when": {"options.attack": "boundary"}},
    }, "fixed": {"options.margin": 0.1}}, "synthetic.yaml", method=None)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        p = space.sample(trial)
        assert ("options.warmup" in p) == (p["options.schedule"] != "constant")
        assert ("options.gamma" in p) == (p["options.attack"] == "boundary")
        assert p["options.margin"] == 0.1
        assert set(space.distributions(p)) == set(p) - {"options.margin"}
        study.tell(trial, 0.0)
        seen.add((p["options.schedule"], p["options.attack"]))
    assert len(seen) == 6  # every branch of the tree was visited


def test_pareto_front_keeps_non_dominated_only():
    rows = [{"id": i, "val_clean_acc": c, "val_robust_acc": r}
            for i, (c, r) in enumerate([(0.9, 0.2), (0.8, 0.4), (0.7, 0.3), (0.6, 0.5), (0.9, 0.1), (0.6, 0.5)])]
    assert sorted(r["id"] for r in pareto_front(rows)) == [0, 1, 3, 5]


# ------------------------------------------------------------------------------ on Ray
def _study_ids(out: Path, name: str) -> list[str]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")
    return [t.user_attrs["tune_trial_id"] for t in study.trials]


@pytest.mark.ray
def test_four_trial_search_with_asha(ray_session, digits, tmp_path):
    from raydefense.cli.train import make_train_config

    space = load_search_space(SPACES_DIR / "trades.yaml", "trades")
    req = TuneRequest("trades", space, TrainConfig(epochs=2, **TINY), tmp_path, samples=4, grace_period=1,
                      masking=NO_MASKING)
    outcome = run_tune(req, digits)
    assert not outcome.unfinished and not outcome.errors
    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"ok", "stopped"}
    first = json.loads(rows[0]["params"])  # the default configuration is enqueued first
    assert first == {"options.beta": 6.0, "train.lr": 0.1, "train.weight_decay": 5e-4}
    for r in rows:
        assert r["epochs_run"] == 2 if r["status"] == "ok" else r["epochs_run"] < 2
        assert r["val_tradeoff"] == pytest.approx((r["val_clean_acc"] + r["val_robust_acc"]) / 2)
    assert outcome.epochs_run == sum(r["epochs_run"] for r in rows) <= 8
    assert outcome.stopped == sum(r["status"] == "stopped" for r in rows)
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["masking_checked"] and best[0]["masking_gap"] >= 0
    assert best[0]["val_tradeoff"] == max(r["val_tradeoff"] for r in rows if r["status"] == "ok")
    cfg = make_train_config("trades", {}, [], tmp_path / "best.json")  # usable by `raydefense train --config`
    params = json.loads(best[0]["params"])
    assert cfg.options["beta"] == pytest.approx(params["options.beta"]) and cfg.lr == pytest.approx(params["train.lr"])
    ids = _study_ids(tmp_path, study_name(req))
    assert sorted(ids) == sorted(r["trial_id"] for r in rows)
    # running the finished search again changes nothing (idempotent mirror, restored experiment)
    again = run_tune(req, digits)
    assert len(again.rows) == 4 and sorted(_study_ids(tmp_path, study_name(req))) == sorted(ids)


@pytest.mark.ray
def test_masking_flag_excludes_trial_from_best(ray_session, digits, tmp_path):
    """With a negative threshold every checked trial is 'masked': no best, no best.json."""
    space = parse_search_space({"dimensions": {"options.beta": {"type": "float", "low": 1, "high": 6}}}, "s.yaml", "trades")
    req = TuneRequest("trades", space, TrainConfig(epochs=1, **TINY), tmp_path, samples=2, scheduler="fifo",
                      masking=MaskingCheck(top_k=1, threshold=-1.0, n=32, steps=3, restarts=1))
    outcome = run_tune(req, digits)
    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert outcome.best is None and not (tmp_path / "best.json").exists()
    assert [r["masking_flag"] for r in rows].count(True) == 1 and not any(r["best"] for r in rows)


@pytest.mark.ray
def test_pareto_mode_returns_non_dominated_trials(ray_session, digits, tmp_path):
    space = load_search_space(SPACES_DIR / "mart.yaml", "mart")
    req = TuneRequest("mart", space, TrainConfig(epochs=1, **TINY), tmp_path, samples=4, objective="pareto",
                      masking=NO_MASKING)
    outcome = run_tune(req, digits)
    ok = [r for r in outcome.rows if r["status"] == "ok"]
    assert len(ok) == 4 and outcome.pareto
    dom = lambda a, b: (a["val_clean_acc"] >= b["val_clean_acc"] and a["val_robust_acc"] >= b["val_robust_acc"]  # noqa: E731
                        and (a["val_clean_acc"], a["val_robust_acc"]) != (b["val_clean_acc"], b["val_robust_acc"]))
    for f in outcome.pareto:
        assert not any(dom(o, f) for o in ok)
    for r in ok:
        assert r["pareto"] or any(dom(f, r) for f in outcome.pareto)
    study = optuna.load_study(study_name=study_name(req), storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.directions) == 2 and len(study.best_trials) >= 1
    with pytest.raises(UserError, match="pareto"):
        TuneRequest("mart", space, TrainConfig(), tmp_path, objective="pareto", scheduler="asha").validate()




@pytest.mark.ray
@pytest.mark.timeout(1500)  # two CLI processes; minutes on a loaded 2-core machine
def test_interrupted_search_resumes_and_study_stays_consistent(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "raydefense", "tune", "trades", "--samples", "3", "--epochs", "3",
           "--grace-period", "1", "--attack-steps", "2", "--val-attack-steps", "2", "--masking-n", "32",
           "--masking-threshold", "1", "--out", str(out), "--address", address]
    # held once Tune has registered a trial's first checkpoint: the search cannot finish before the Ctrl-C
    returncode, first_output = interrupt_at(cmd, "checkpoint", tmp_path / "hold", stop_timeout=120)
    assert returncode == 130, first_output[-3000:]
    assert INTERRUPTED in first_output and "Traceback" not in first_output, first_output[-3000:]
    assert "created in memory" not in first_output  # Optuna's note about Tune's internal study misleads
    assert not (out / "trials.parquet").exists() and not (out / "best.json").exists()
    name = "raydefense-trades-tradeoff"
    before = _study_ids(out, name) if (out / "optuna.db").exists() else []

    second = subprocess.run(cmd, capture_output=True, text=True, env=unbuffered_env(), timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"ok", "stopped"}
    ids = _study_ids(out, name)
    assert sorted(ids) == sorted(r["trial_id"] for r in rows)  # one study trial per Tune trial, no duplicate
    assert set(before) <= set(ids)
    # Resumed trials continue from their last persisted checkpoint and never start over. The one epoch
    # that was in flight when SIGINT arrived may run again (Tune resumes from the last checkpoint it
    # committed), so at most one epoch may appear twice; epochs never go backwards.
    for result_log in (out / "tune").glob("*/result.json"):
        epochs = [r["epoch"] for r in map(json.loads, result_log.read_text().splitlines()) if not r["done_training"]]
        repeated = [e for e in set(epochs) if epochs.count(e) > 1]
        assert epochs == sorted(epochs), (result_log.parent.name, epochs)  # a start-over would go backwards
        assert len(repeated) <= 1 and all(epochs.count(e) == 2 for e in repeated), (result_log.parent.name, epochs)
    assert (out / "best.json").is_file()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_trials_cut_short_by_ctrl_c_do_not_count_as_stopped_by_the_scheduler(ray_session, tmp_path):
    # On Ctrl-C Tune saves the state it resumes from, then stops every live trial and marks it
    # TERMINATED in memory, just like a trial ASHA stopped; the saved state tells them apart.
    import os
    import signal

    from ray import tune

    from raydefense.tune import _statuses

    def slow_trainable(config):  # defined here: pickled by value, so Ray workers need not import the tests
        import time

        from ray import tune

        for i in range(300):
            tune.report({"i": i})
            time.sleep(0.1)

    class InterruptOnFirstResult(tune.Callback):
        sent = False

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; Tune's handler catches it

    grid = tune.Tuner(tune.with_resources(slow_trainable, {"cpu": 1}), tune_config=tune.TuneConfig(num_samples=2),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), name="cut", verbose=0,
                                                callbacks=[InterruptOnFirstResult()])).fit()
    statuses = _statuses(grid)
    assert len(statuses) == 2 and not {"TERMINATED", "ERROR"} & set(statuses), statuses
