"""Cluster config check, bad cluster input, error reporting and fault tolerance on a fake 2-node cluster."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from raydefense.errors import UserError
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]




# --- cluster.yaml -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_shipped_cluster_configs_are_valid(name):
    from raydefense.distributed.cluster_config import check_cluster_config

    check = check_cluster_config(ROOT / name)
    types = {n.name: n for n in check.node_types}
    head = types["head.cpu"]
    assert head.role == "head" and head.resources.get("GPU", 0) == 0
    workers = [n for n in check.node_types if n.role == "worker"]
    assert {n.market for n in workers} == {"on-demand", "spot"}
    assert all(n.resources["GPU"] >= 1 and n.min_workers == 0 < n.max_workers for n in workers)
    assert check.idle_timeout_minutes > 0 and not check.warnings
    # Ray's defaults were filled in, as `ray up` would see the file
    assert check.config["worker_setup_commands"] and "ray start" in check.config["head_start_ray_commands"][-1]


def _broken(tmp_path, mutate) -> Path:
    config = copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    mutate(config)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["available_node_types"]["gpu.spot"].__setitem__("min_workers", "two"),
     "available_node_types.gpu.spot.min_workers: 'two' is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu.spot"]["resources"].__setitem__("GPU", -1),
     "available_node_types.gpu.spot.resources.GPU: -1 is less than the minimum of 0"),
    (lambda c: c.__setitem__("idle_timeout_mins", 3), "'idle_timeout_mins' was unexpected"),
    (lambda c: c["available_node_types"]["gpu.spot"].pop("node_config"),
     "available_node_types.gpu.spot: 'node_config' is a required property"),
    (lambda c: c.__setitem__("head_node_type", "head.gpu"), "head_node_type:"),
    (lambda c: c["available_node_types"]["gpu.spot"].__setitem__("min_workers", 7),
     "available_node_types.gpu.spot: min_workers 7 > max_workers 6"),
    (lambda c: c["provider"].__setitem__("type", "openstack"), "provider.type: 'openstack' is not one of"),
])
def test_broken_cluster_configs_are_rejected_with_their_path(tmp_path, mutate, expected):
    from raydefense.distributed.cluster_config import check_cluster_config

    with pytest.raises(UserError, match="problem") as info:
        check_cluster_config(_broken(tmp_path, mutate))
    assert expected in str(info.value)


def test_cluster_check_cli(tmp_path, capsys):
    assert run_cli(*["cluster", "check", str(ROOT / "cluster.yaml")]) == 0
    assert "valid Ray aws cluster config" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("cluster_name: x\nprovider: {type: aws\n")
    assert run_cli(*["cluster", "check", str(tmp_path / "bad.yaml")]) == 2
    assert "is not valid YAML at line 3" in capsys.readouterr().err


# --- addresses, storage, checkpoints ------------------------------------------------------------


def test_addresses_that_do_not_answer_fail_fast():
    """Refused, silent and not-Ray addresses each end in one clear UserError within seconds."""
    import socket

    from raydefense.distributed.cluster import _probe, _probe_gcs

    with pytest.raises(UserError, match="connection refused"):
        _probe("127.0.0.1:1", timeout=1)
    with pytest.raises(UserError, match="cannot read cluster address"):
        _probe("head-node")
    with socket.socket() as server:  # accepts TCP, never speaks Ray's protocol
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        _probe(address, timeout=1)
        tic = time.monotonic()
        with pytest.raises(UserError, match="is not a Ray cluster head"):
            _probe_gcs(address, timeout=1)
        assert time.monotonic() - tic < 15


def test_storage_and_dashboard_host_checks(tmp_path):
    from raydefense.distributed.cluster import check_dashboard_host
    from raydefense.distributed.experiment import check_storage, storage_uri

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_storage(str(tmp_path / "afile"))
    with pytest.raises(UserError, match="unknown scheme ftp://"):
        check_storage("ftp://host/x")
    with pytest.raises(UserError, match="names no bucket"):
        check_storage("s3://")
    # two sweeps sharing one bucket get two experiments
    assert storage_uri(tmp_path / "a", "s3://bucket/runs/") == "s3://bucket/runs/a"
    assert storage_uri(tmp_path / "a", None) == str((tmp_path / "a").resolve())
    # --fresh with --storage removes the old experiment there too (else it would be resumed)
    from raydefense.distributed.experiment import delete_storage

    (tmp_path / "store" / "a" / "tune").mkdir(parents=True)
    (tmp_path / "store" / "b").mkdir()
    delete_storage(tmp_path / "a", f"file://{tmp_path / 'store'}")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["b"]
    assert check_dashboard_host("localhost") == "127.0.0.1"
    with pytest.raises(UserError, match="--dashboard-host"):
        check_dashboard_host("my laptop")


def test_cli_refuses_checkpoint_holding_pickled_objects(tmp_path, digits, capsys):
    from raydefense.config import TrainConfig
    from raydefense.train import fit

    fit(TrainConfig(method="natural", epochs=1, val_attack_steps=1), tmp_path / "ck", splits=digits)
    assert run_cli(*["evaluate", str(tmp_path / "ck"), "--attacks", "clean", "--n", "20"]) == 0
    capsys.readouterr()
    torch.save({"weights": argparse.Namespace(evil=True)}, tmp_path / "ck" / "model.pt")
    assert run_cli(*["evaluate", str(tmp_path / "ck"), "--attacks", "clean", "--n", "20"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "model.pt" in err and "pickled" in err and "Traceback" not in err
    (tmp_path / "ck" / "model.pt").unlink()
    assert run_cli(*["evaluate", str(tmp_path / "ck"), "--attacks", "clean"]) == 2
    assert "missing checkpoint file" in capsys.readouterr().err


# --- errored and unfinished trials --------------------------------------------------------------


def test_errored_trials_are_reported_with_their_error(tmp_path, digits):
    """A trial that used up its retries is a row with status 'error' and its error's last line."""
    from raydefense.config import TrainConfig
    from raydefense.sweep import SweepRequest, collect

    req = SweepRequest([0, 2], [0], TrainConfig(epochs=1), tmp_path)
    failed = SimpleNamespace(config={"point": {"budget": 2}, "train.seed": 0}, metrics={"time_total_s": 3.0},
                             error=RuntimeError("Traceback ...\nray.exceptions.NodeDiedError: node abc died"),
                             checkpoint=None)
    unfinished = SimpleNamespace(config={"point": {"budget": 0}, "train.seed": 0},
                                 metrics={"done_training": False}, error=None, checkpoint=None)
    outcome = collect([failed], req, digits)
    assert outcome.errors == ["budget 2 seed 0: ray.exceptions.NodeDiedError: node abc died"]
    assert outcome.rows[0]["status"] == "error" and math.isnan(outcome.rows[0]["clean_acc"])
    assert outcome.table is not None and not outcome.unfinished
    outcome = collect([failed, unfinished], req, digits)
    assert outcome.unfinished == 1 and len(outcome.errors) == 1


# --- a fake 2-node cluster ----------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_survives_losing_a_worker_node(tmp_path):
    """Trials land on both nodes; the worker node is removed mid-sweep; every trial still finishes
    (the lost one retried from its checkpoint on the head) and the command exits 0.

    Runs in a subprocess: ray.cluster_utils.Cluster needs a Ray of its own, apart from any Ray
    this test session has started."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_cluster_sweep.py"), str(tmp_path / "sweep"),
                           "--epochs", "3", "--max-failures", "3"],
                          capture_output=True, text=True, env=env, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["returncode"] == 0 and report["removed_at_epoch"] is not None, report["output_tail"]
    head, worker = report["head"], report["worker"]
    trials = report["trials"]
    assert len(trials) == 2
    nodes = {r["node_id"] for rs in trials.values() for r in rs}
    assert nodes == {head, worker}  # trials landed on both nodes
    for rs in trials.values():
        final = rs[-1]
        assert final["done_training"] and final["epochs_run"] == 3 and final["node_id"] == head
    moved = [rs for rs in trials.values() if rs[0]["node_id"] == worker]
    assert len(moved) == 1
    assert moved[0][-1]["resumed_from_epoch"] >= 1  # retried from its checkpoint, not from scratch
    assert (tmp_path / "sweep" / "sweep.parquet").is_file()


# --- data-parallel workers ----------------------------------------------------------------------


def test_two_gloo_workers_follow_the_one_worker_loss_curve(tmp_path, digits):
    """2 processes (gloo), each half of every batch, gradients averaged: the same per-epoch loss and
    accuracy as one process with the same global batch (natural training: no random attack starts)."""
    from raydefense.config import TrainConfig
    from raydefense.distributed.train_workers import fit_local_workers
    from raydefense.train import fit

    cfg = TrainConfig(method="natural", epochs=3, batch_size=64, lr=0.05, val_attack_steps=1, threads=1)
    single = fit(cfg, tmp_path / "one", splits=digits).history
    double = fit_local_workers(cfg.to_dict(), tmp_path / "two", workers=2, splits=digits)
    assert len(double) == 3
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(single, double)]
    assert single[-1]["train_loss"] < 0.5 * single[0]["train_loss"]  # it trains at all
    for a, b in losses:  # not bit-equal: the last batch splits unevenly, and float sums reorder
        assert b == pytest.approx(a, rel=5e-3), losses
    assert [h["val_clean_acc"] for h in double] == pytest.approx([h["val_clean_acc"] for h in single], abs=0.006)
    # the two workers hold the same weights (averaged gradients), close to the single worker's
    w0, w1, w = (torch.load(d / "trainer_state.pt", weights_only=True)["modules"]
                 for d in (tmp_path / "two" / "rank0", tmp_path / "two" / "rank1", tmp_path / "one"))
    for module, state in w0.items():
        for name, tensor in state.items():
            assert torch.equal(tensor, w1[module][name]), name
            assert torch.allclose(tensor, w[module][name], atol=2e-2), name


@pytest.mark.ray
@pytest.mark.slow
def test_workers_per_trial_runs_a_torch_trainer_inside_the_trial(ray_session, digits, tmp_path):
    """--workers-per-trial 2: the trial drives a Ray Train TorchTrainer of 2 gloo workers (0.9 CPU
    each, so both fit beside the trial's 0.01 CPU in the 2-CPU test Ray); rank 0's checkpoint
    becomes the sweep's extractor, and Train's run is kept in the trial's storage directory."""
    from raydefense import load_model
    from raydefense.config import TrainConfig
    from raydefense.distributed.experiment import Resources
    from raydefense.sweep import SweepRequest, run_afs_sweep

    req = SweepRequest([2], [0], TrainConfig(epochs=2, attack_steps=2, val_attack_steps=2), tmp_path,
                       resources=Resources(0.9, 0, 2))
    outcome = run_afs_sweep(req, digits)
    assert not outcome.errors and not outcome.unfinished
    (row,) = outcome.rows
    assert row["status"] == "ok" and row["epochs_run"] == 2 and row["clean_acc"] > 0.5
    (result,) = [json.loads(p.read_text().splitlines()[-1]) for p in (tmp_path / "tune").glob("*/result.json")]
    assert result["workers"] == 2 and result["done_training"]
    assert list((tmp_path / "tune").glob("*/train/checkpoint_*"))  # Train's run beside the trial
    x, _ = digits.test.tensors()
    assert load_model(row["checkpoint"])(x[:4]).shape == (4, 10)


@pytest.mark.ray
def test_wrong_auth_token_gets_the_token_message(ray_session):
    """Ray 2.60 clusters use token authentication by default: a client with the wrong token is told
    how to get the right one, quickly, instead of a generic connection failure."""
    address = ray_session.get_runtime_context().gcs_address
    code = ("import sys\nfrom raydefense.distributed.cluster import _probe_gcs\nfrom raydefense.errors import UserError\n"
            "try:\n    _probe_gcs(sys.argv[1])\nexcept UserError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_TOKEN": "0" * 32}
    proc = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, env=env, timeout=120)
    assert "uses token authentication" in proc.stdout and "RAY_AUTH_TOKEN" in proc.stdout, proc.stdout + proc.stderr
