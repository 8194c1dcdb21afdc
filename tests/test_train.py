import json

import pytest
import torch

from raydefense import load_model
from raydefense.checkpoint import load_method
from raydefense.config import TrainConfig
from raydefense.errors import CheckpointError, UserError
from raydefense.methods import MethodContext, build_method, method_names
from raydefense.train import fit

FAST = dict(epochs=1, attack_steps=2, val_attack_steps=2)


@pytest.mark.parametrize("method", ["natural", "pgd-at", "trades", "mart"])
def test_a_few_steps_lower_the_loss(digits, method):
    cfg = TrainConfig(method=method, attack_steps=3, lr=0.05)
    x, y = digits.train.tensors()
    ctx = MethodContext(cfg, digits.info, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = build_method(ctx)
    m.optimizers = m.configure_optimizers()
    xb, yb = x[:128], y[:128]
    losses = [m.train_step(xb, yb)["loss"] for _ in range(20)]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_checkpoint_round_trip(tmp_path, digits):
    res = fit(TrainConfig(method="pgd-at", **FAST), tmp_path, splits=digits)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["finished"] and cfg["kind"] == "method" and cfg["best"]["epoch"] == 1
    model = load_model(tmp_path)
    assert not model.training
    method = load_method(tmp_path)
    x, _ = digits.val.tensors()
    with torch.no_grad():
        assert torch.equal(model(x[:20]), method.inference_module()(x[:20]))
        assert model(x[:20]).shape == (20, 10)
    assert 0 <= res.best["val_robust_acc"] <= res.best["val_clean_acc"] <= 1


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path, digits):
    """A run interrupted after epoch 1 and resumed equals an uninterrupted run, weight for weight."""
    cfg = TrainConfig(method="pgd-at", epochs=3, attack_steps=2, val_attack_steps=2)
    full = fit(cfg, tmp_path / "full", splits=digits)

    def stop_after_first(metrics, _):
        if metrics["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, tmp_path / "cut", splits=digits, reporter=stop_after_first)
    assert not json.loads((tmp_path / "cut" / "config.json").read_text())["finished"]
    seen = []
    resumed = fit(cfg, tmp_path / "cut", splits=digits, reporter=lambda m, _: seen.append(m["epoch"]))
    assert seen == [2, 3]  # epoch 1 was not trained again
    assert [h["val_clean_acc"] for h in resumed.history] == [h["val_clean_acc"] for h in full.history]
    a = torch.load(tmp_path / "full" / "trainer_state.pt", weights_only=True)["modules"]["model"]
    b = torch.load(tmp_path / "cut" / "trainer_state.pt", weights_only=True)["modules"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_run(tmp_path, digits):
    fit(TrainConfig(method="natural", epochs=1), tmp_path, splits=digits)
    with pytest.raises(UserError, match="different settings"):
        fit(TrainConfig(method="natural", epochs=1, lr=0.01), tmp_path, splits=digits)


def test_pickled_objects_are_refused(tmp_path, digits):
    fit(TrainConfig(method="natural", epochs=1), tmp_path, splits=digits)
    torch.save({"model": {"weight": torch.zeros(1)}, "evil": Interrupt()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_model(tmp_path)


def test_corrupt_or_missing_checkpoint(tmp_path, digits):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    tmp_path.joinpath("config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)


def test_bad_options_are_named(digits):
    with pytest.raises(UserError, match="unknown option 'betaa'"):
        build_method(MethodContext(TrainConfig(method="trades", options={"betaa": 1}), digits.info, torch.device("cpu")))
    with pytest.raises(UserError, match="eps must be >= 0"):
        fit(TrainConfig(eps=-0.1), "/tmp/never-written", splits=digits)
    assert {"natural", "pgd-at", "trades", "mart"} <= set(method_names())


def test_early_stopping_keeps_the_best_epoch(tmp_path, digits, monkeypatch):
    """Scripted validation curve: best at epoch 2, then two worse epochs -> stop after epoch 4."""
    import raydefense.train as train_mod

    curve = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    monkeypatch.setattr(train_mod, "accuracy", lambda *a, **k: next(curve))
    res = fit(TrainConfig(method="natural", epochs=6, patience=2), tmp_path, splits=digits)
    assert res.stopped_early and len(res.history) == 4
    assert res.best["epoch"] == 2 and res.best["val_clean_acc"] == 0.7
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["best"]["epoch"] == 2 and cfg["epochs_run"] == 4 and cfg["stopped_early"]
