"""Guards against bad numbers and damaged files: divergence, option ranges, cut or corrupt files,
refused checkpoints. Each case ends in one clear line and a non-zero exit, never a run that looks
complete."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydefense import load_model
from raydefense.config import TrainConfig
from raydefense.errors import CheckpointError, TrainingDiverged, UserError
from raydefense.methods import REGISTRY
from raydefense.methods.baselines import Natural
from raydefense.train import fit, read_history
from helpers import run_cli

FAST = dict(epochs=3, val_attack_steps=1)


class NanAtEpochTwo(Natural):
    """Trains normally, then its loss is NaN from the second epoch on (a planted divergence)."""

    def train_step(self, x, y):
        metrics = super().train_step(x, y)
        return {**metrics, "nll": math.nan if self.epoch >= 1 else 0.0}


class NanWeightAtEpochTwo(Natural):
    """Finite losses, but a weight turns NaN after the last step of the second epoch: only the
    per-epoch weight check can see it."""

    def train_step(self, x, y):
        metrics = super().train_step(x, y)
        if self.epoch >= 1 and self.batch_in_epoch == self.ctx.steps_per_epoch - 1:
            with torch.no_grad():
                self.model.head.bias.fill_(math.nan)
        return metrics


@pytest.fixture
def planted(monkeypatch):
    monkeypatch.setitem(REGISTRY, "nan-loss", "test_guards:NanAtEpochTwo")
    monkeypatch.setitem(REGISTRY, "nan-weight", "test_guards:NanWeightAtEpochTwo")


@pytest.mark.parametrize("method,reason", [
    ("nan-loss", "training diverged at epoch 2: loss term 'nll' is nan"),
    ("nan-weight", "training diverged at epoch 2: weight model.head.bias holds NaN/inf"),
])
def test_divergence_stops_and_never_looks_finished(tmp_path, digits, planted, method, reason):
    cfg = TrainConfig(method=method, **FAST)
    with pytest.raises(TrainingDiverged) as err:
        fit(cfg, tmp_path, splits=digits)
    assert str(err.value) == reason and err.value.exit_code == 1
    config = json.loads((tmp_path / "config.json").read_text())  # epoch 1 (finite) was the best so far
    assert config["finished"] is False and config["diverged"] == reason and config["best"]["epoch"] == 1
    assert len(read_history(tmp_path / "metrics.jsonl", 99)) == 1  # nothing of epoch 2 was kept
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["epoch"] == 1
    model = load_model(tmp_path)  # the kept weights are the finite epoch-1 ones
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(TrainingDiverged, match="epoch 2"):  # a resume does not take it as done
        fit(cfg, tmp_path, splits=digits)
    assert json.loads((tmp_path / "config.json").read_text())["finished"] is False


def test_a_diverging_run_through_the_cli_exits_1_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "raydefense", "train", "natural", "--lr", "1e30", "--epochs", "2",
                           "--val-attack-steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training diverged at epoch 1: loss term 'loss' is nan"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    config = out / "config.json"
    assert not config.exists() or not json.loads(config.read_text())["finished"]


@pytest.mark.ray
def test_a_diverging_sweep_trial_is_reported_failed_with_the_reason(ray_session, digits, tmp_path):
    from raydefense.sweep import SweepRequest, run_afs_sweep

    req = SweepRequest([0], [0], TrainConfig(epochs=1, attack_steps=1, val_attack_steps=1, lr=1e30), tmp_path,
                       max_failures=0)
    outcome = run_afs_sweep(req, digits)
    assert [r["status"] for r in outcome.rows] == ["error"]
    assert "training diverged at epoch 1: loss term 'loss' is nan" in outcome.rows[0]["error"]
    assert len(outcome.errors) == 1 and "diverged" in outcome.errors[0]
    assert outcome.rows[0]["checkpoint"] is None


@pytest.mark.parametrize("args,message", [
    (["--weight-decay", "-1"], "weight_decay must be >= 0, got -1.0"),
    (["--momentum", "-0.5"], "momentum must be >= 0 and < 1, got -0.5"),
    (["--eps", "8"], "eps must be >= 0 and <= 1, got 8.0 (inputs are images in [0, 1]"),
    (["--attack-step-size", "0"], "attack_step_size must be > 0"),
    (["--lr", "0"], "lr must be > 0, got 0.0"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--eps-warmup-epochs", "-1"], "eps_warmup_epochs must be >= 0"),
    (["--config", "{lr_nan}"], "lr must be a finite number, got nan"),
    (["--config", "{list}"], "must hold a JSON object of options, not a list"),
    (["--config", "{options_int}"], "'options' must be a JSON object of method options, not a int"),
    (["--config", "{beta_inf}"], "beta must be a finite number, got inf"),
    (["--out", "{a_file}"], "is an existing file, not a directory"),
    (["--out", "{a_file}/sub"], "is a file, not a directory"),
])
def test_bad_numbers_and_files_get_one_line_and_exit_2(tmp_path, capsys, args, message):
    files = {"lr_nan": '{"lr": NaN}', "list": "[1, 2]", "options_int": '{"options": 3}',
             "beta_inf": '{"options": {"beta": Infinity}}', "a_file": "x"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [a.format(**{n: tmp_path / n for n in files}) for a in args]
    out = [] if "--out" in args else ["--out", tmp_path / "o"]
    assert run_cli("train", "trades", "--epochs" if "--epochs" not in args else "--seed", "1", *out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_values_from_python_or_a_search_meet_the_same_ranges():
    with pytest.raises(UserError, match="lr must be a finite number"):
        TrainConfig(lr=math.nan)
    with pytest.raises(UserError, match="momentum must be >= 0 and < 1"):
        TrainConfig.from_dict({"momentum": 1.5})
    with pytest.raises(UserError, match="weight_decay"):
        TrainConfig().replace(weight_decay=-1e-4)


def test_an_uncreatable_output_directory_is_a_user_error(digits):
    with pytest.raises(UserError, match="cannot create the output directory"):
        fit(TrainConfig(method="natural", epochs=1), Path("/proc/no/such/dir"), splits=digits)


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path, digits, caplog):
    cfg = TrainConfig(method="natural", epochs=2, val_attack_steps=1)

    class Crash(Exception):
        pass

    def crash_after_first(metrics, _):
        raise Crash

    with pytest.raises(Crash):
        fit(cfg, tmp_path, splits=digits, reporter=crash_after_first)
    metrics = tmp_path / "metrics.jsonl"
    first = metrics.read_text()
    metrics.write_text(first + first[: len(first) // 2])  # a second line cut mid-write
    with caplog.at_level("WARNING"):
        assert len(read_history(metrics, 2)) == 1
    assert "cut by an interrupted write" in caplog.text
    metrics.write_text(first[: len(first) // 2])  # the one line trainer_state counts is cut
    result = fit(cfg, tmp_path, splits=digits)
    assert result.start_epoch == 1 and [h["epoch"] for h in result.history] == [2]
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [2]  # rewritten whole: no cut line left
    assert json.loads((tmp_path / "config.json").read_text())["finished"]


def test_a_corrupt_line_inside_metrics_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1\n{"epoch": 2}\n')
    with pytest.raises(CheckpointError, match="line 1 is not JSON"):
        read_history(path, 2)


def test_evaluate_batch_size_0_and_a_corrupt_cache_entry(tmp_path, capsys, natural_ckpt):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(natural_ckpt, ckpt, ignore=shutil.ignore_patterns("eval*", "report.md"))
    assert run_cli("evaluate", ckpt, "--batch-size", "0", "--n", "20") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --batch-size must be >= 1, got 0"
    assert run_cli("evaluate", ckpt, "--attacks", "fgsm", "--n", "20", "--no-probes") == 0
    entries = sorted((ckpt / "eval_cache").rglob("*.json"))
    assert entries
    first = json.loads(entries[0].read_text())
    entries[0].write_text(entries[0].read_text()[:10])  # cut by a crash
    if len(entries) > 1:
        entries[1].write_text(json.dumps({"correct": [1], "seconds": 0.0}))  # wrong length
    capsys.readouterr()
    assert run_cli("evaluate", ckpt, "--attacks", "fgsm", "--n", "20", "--no-probes") == 0
    assert "ignoring the corrupt cache entry" in capsys.readouterr().err  # the CLI's log handler
    assert json.loads(entries[0].read_text())["correct"] == first["correct"]  # recomputed and rewritten


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("save", [
    lambda obj, p: torch.save(obj, p),
    lambda obj, p: torch.save(obj, p, _use_new_zipfile_serialization=False),
    lambda obj, p: torch.save(obj, p, pickle_protocol=4),
    lambda obj, p: Path(p).write_bytes(__import__("pickle").dumps(obj, protocol=4)),
])
def test_pickled_code_is_refused_by_name_without_torch_warnings(tmp_path, natural_ckpt, save, recwarn):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(natural_ckpt, ckpt)
    save({"model": Evil()}, ckpt / "model.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    message = str(err.value)
    assert "pickled objects, i.e. code to import and run" in message and "print" in message, message
    assert "corrupt" not in message and "\n" not in message
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "pickle" in str(w.message)]


def test_a_weights_model_misfit_names_shapes_and_datasets(tmp_path, natural_ckpt):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(natural_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["dataset"].update(name="cifar10", shape=[3, 8, 8], mean=[0.5] * 3, std=[0.25] * 3)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    message = str(err.value)
    assert "\n" not in message and "Error(s) in loading" not in message
    assert "(for 1-channel inputs, 10 classes)" in message  # what the weights were trained on
    assert "small-cnn on cifar10: 3x8x8 inputs" in message  # what the config asks for
    assert "backbone.blocks.0.0.weight is [16, 1, 3, 3] in model.pt but [16, 3, 3, 3] in the model" in message


def test_a_checkpoint_saved_with_a_nan_option_names_its_config(tmp_path, natural_ckpt):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(natural_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["train"]["lr"] = math.nan  # what the old code saved for "lr": NaN
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json holds invalid training options: .*lr must be a finite"):
        load_model(ckpt)
