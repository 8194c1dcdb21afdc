"""The AFS sweep as a real Ray Tune experiment: end to end, fractional GPUs, interrupt + resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from raydefense import load_model
from raydefense.config import TrainConfig
from raydefense.distributed.experiment import Resources
from raydefense.sweep import SWEEP_COLUMNS, SweepRequest, run_afs_sweep
from raydefense.cli import INTERRUPTED
from helpers import interrupt_at, read_results, unbuffered_env

pytestmark = pytest.mark.ray
TINY = dict(epochs=1, attack_steps=2, val_attack_steps=2)


def test_two_budget_sweep_with_fractional_gpus(ray_session, digits, tmp_path):
    """Two trials share logical GPUs at 0.5 each while the models themselves train on the CPU."""
    req = SweepRequest([0, 4], [0], TrainConfig(**TINY), tmp_path, resources=Resources(1, 0.5))
    outcome = run_afs_sweep(req, digits)
    assert not outcome.errors and not outcome.unfinished
    rows = pq.read_table(tmp_path / "sweep.parquet").to_pylist()
    assert [r["budget"] for r in rows] == [0, 4]
    assert set(SWEEP_COLUMNS) | {"seed", "wall_time_s", "status"} <= set(rows[0])
    assert rows[1]["eps"] == pytest.approx(4 * digits.info.eps_unit)
    for r in rows:
        assert r["status"] == "ok" and 0 <= r["pgd20_acc"] <= r["pgd10_acc"] + 0.02 and r["delta_z"] > 0
        ckpt = Path(r["checkpoint"])
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["train"]["eps"] == pytest.approx(r["eps"]) and cfg["train"]["device"] == "cpu"
        assert not (ckpt / "trainer_state.pt").exists()
        x, _ = digits.test.tensors()
        assert load_model(ckpt)(x[:4]).shape == (4, 10)
    results = [json.loads(p.read_text().splitlines()[-1]) for p in (tmp_path / "tune").glob("*/result.json")]
    assert len(results) == 2
    assert all(r["trial_gpus"] == 0.5 and r["gpu_ids"] != "" for r in results)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert not torch.cuda.is_available()  # the GPU share was scheduling only




def test_interrupted_sweep_resumes_from_checkpoints(ray_session, tmp_path):
    """Ctrl-C mid-sweep while one trial is still pending, run the same command again: trials continue
    from their checkpoints and the pending one runs."""
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "raydefense", "sweep", "afs", "--budgets", "0,3,6", "--epochs", "3",
           "--attack-steps", "2", "--val-attack-steps", "2", "--out", str(out), "--address", address]
    # held once Tune has registered a trial's first checkpoint: the 2 CPUs run two trials, the third waits
    returncode, first_output = interrupt_at(cmd, "checkpoint", tmp_path / "hold", stop_timeout=300)
    assert returncode == 130, first_output[-3000:]
    assert INTERRUPTED in first_output and "Traceback" not in first_output, first_output[-3000:]
    assert not (out / "sweep.parquet").exists()  # no table that looks complete
    assert sum(bool(lines) for lines in read_results(out / "tune").values()) < 3  # a trial had not started

    second = subprocess.run(cmd, capture_output=True, text=True, env=unbuffered_env(), timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["budget"] for r in rows] == [0, 3, 6] and all(r["status"] == "ok" for r in rows)
    finals = [json.loads(p.read_text().splitlines()[-1]) for p in (out / "tune").glob("*/result.json")]
    assert len(finals) == 3 and all(f["done_training"] and f["epochs_run"] == 3 for f in finals)
    assert max(f["resumed_from_epoch"] for f in finals) >= 1  # the held trial did not start over


def test_changed_request_is_refused(ray_session, digits, tmp_path):
    from raydefense.errors import UserError

    (tmp_path / "request.json").write_text(json.dumps({"kind": "afs-sweep", "budgets": [0, 1]}))
    with pytest.raises(UserError, match="different experiment"):
        run_afs_sweep(SweepRequest([0, 4], [0], TrainConfig(**TINY), tmp_path), digits)
