"""Fast paths (raydefense/fast.py) compute the same thing as the plain path; no timings here
(speed is measured only by benchmarks/run.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from raydefense.attacks import pgd_ce
from raydefense.checkpoint import read_config
from raydefense.config import TrainConfig
from raydefense.errors import UserError
from raydefense.fast import GradScalerStep, autocast, prepare_modules, to_memory_format, validate_fast_paths
from raydefense.methods import MethodContext, build_method

CPU = torch.device("cpu")


def _method(digits, init: dict | None = None, **fast):
    cfg = TrainConfig(method="pgd-at", eps_warmup_epochs=0, attack_steps=5, device="cpu", **fast)
    method = build_method(MethodContext(cfg, digits.info, CPU, generator=torch.Generator().manual_seed(0)))
    if init is not None:
        method.model.load_state_dict(init)
    prepare_modules(method.modules().values(), cfg)
    method.optimizers = method.configure_optimizers()
    return cfg, method


def _steps(digits, init: dict, n: int = 3, **fast):
    """n training steps of pgd-at from a fixed init (a trained natural model, so that predictions
    are confident rather than coin flips); returns the losses and the final model."""
    cfg, method = _method(digits, init, **fast)
    x, y = digits.train.tensors()
    losses = []
    method.model.train()
    for b in range(n):
        xb, yb = x[b * 64:(b + 1) * 64], y[b * 64:(b + 1) * 64]
        with autocast(cfg, CPU):
            losses.append(method.train_step(to_memory_format(xb, cfg), yb)["loss"])
    return losses, method.model.eval()


@pytest.fixture(scope="module")
def init(natural_model):
    return copy.deepcopy(natural_model.state_dict())


@pytest.fixture(scope="module")
def plain_run(digits, init):
    return _steps(digits, init)


def _val_preds(model, digits):
    vx, _ = digits.val.tensors()
    with torch.no_grad():
        return model(vx).argmax(1)


def test_channels_last_matches_plain(digits, init, plain_run):
    losses, model = _steps(digits, init, channels_last=True)
    ref_losses, ref_model = plain_run
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    assert next(model.backbone.parameters()).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_val_preds(model, digits), _val_preds(ref_model, digits))


def test_bf16_matches_plain_within_tolerance(digits, init, plain_run):
    """bf16 rounds activations (~3 significant digits): the same model predicts the same classes,
    one training step has the same loss and moves the fp32 weights in the same direction.
    (Several steps diverge: a different sign in a few input-gradient entries changes x_adv.)"""
    cfg, model = _method(digits, init, amp="bf16")[0], copy.deepcopy(plain_run[1])
    vx, _ = digits.val.tensors()
    with torch.no_grad():
        model.load_state_dict(init)
        fp32 = model(vx).argmax(1)
        with autocast(cfg, CPU):
            bf16 = model(vx).argmax(1)
    assert (fp32 == bf16).float().mean() >= 0.98
    losses, stepped = _steps(digits, init, n=1, amp="bf16")
    ref_losses, ref_stepped = _steps(digits, init, n=1)
    assert losses == pytest.approx(ref_losses, rel=0.05, abs=0.02)
    assert all(p.dtype == torch.float32 for p in stepped.parameters())
    delta = torch.cat([(stepped.state_dict()[k] - v).flatten() for k, v in init.items()])
    ref_delta = torch.cat([(ref_stepped.state_dict()[k] - v).flatten() for k, v in init.items()])
    assert F.cosine_similarity(delta, ref_delta, dim=0) > 0.9


def test_bf16_attack_at_least_as_strong_as_torchattacks(natural_model, digits):
    """Sign steps tolerate bf16's noisy input gradients: the attack must stay as strong as the
    reference fp32 library's (accuracy and fp32 loss measured on the same fixed model)."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits.test.tensors()
    x, y = x[:200], y[:200]
    eps = 1 / 16
    torch.manual_seed(0)
    ref = torchattacks.PGD(natural_model, eps=eps, alpha=eps / 4, steps=10, random_start=True)(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pgd_ce(natural_model, x, y, eps, 10, eps / 4, generator=torch.Generator().manual_seed(0))
    assert ours.dtype == torch.float32 and (ours - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        clean = (natural_model(x).argmax(1) == y).float().mean()
        acc_ref = (natural_model(ref).argmax(1) == y).float().mean()
        acc_ours = (natural_model(ours).argmax(1) == y).float().mean()
        loss_ref, loss_ours = F.cross_entropy(natural_model(ref), y), F.cross_entropy(natural_model(ours), y)
    assert acc_ours <= clean - 0.1  # the attack does work on a natural model
    assert acc_ours <= acc_ref + 0.03
    assert loss_ours >= 0.9 * loss_ref


def test_grad_scaler_step_equals_plain_step():
    """The fp16 loss-scaling step (CUDA) unscales before the update: on CPU in fp32 it must give the
    plain SGD update exactly."""
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = copy.deepcopy(a)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    GradScalerStep(CPU)(opt_a, F.cross_entropy(a(x), y))
    opt_b.zero_grad()
    F.cross_entropy(b(x), y).backward()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_options_validated():
    with pytest.raises(UserError, match="amp"):
        TrainConfig.from_dict({"amp": "fp8"})
    with pytest.raises(UserError, match="fp16 needs a CUDA"):
        validate_fast_paths(TrainConfig(amp="fp16"), CPU)
    with pytest.raises(UserError, match="compile"):
        TrainConfig.from_dict({"compile": "maybe"})


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog, native):
    import raydefense.fast as fast

    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="raydefense.fast"):
        validate_fast_paths(TrainConfig(amp="bf16"), CPU)
        validate_fast_paths(TrainConfig(amp="off"), CPU)
    warned = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)


def test_options_round_trip_through_config_json(digits, tmp_path):
    """fit records the fast-path options in config.json, and the checkpoint loads back (weights
    saved in channels_last load into a plain model)."""
    from raydefense import load_model
    from raydefense.train import fit

    cfg = TrainConfig(method="pgd-at", epochs=1, attack_steps=2, val_attack_steps=1, amp="bf16",
                      channels_last=True, device="cpu")
    fit(cfg, tmp_path / "run", splits=digits)
    stored = read_config(tmp_path / "run")["train"]
    assert (stored["amp"], stored["channels_last"], stored["compile"]) == ("bf16", True, False)
    assert TrainConfig.from_dict(json.loads(json.dumps(stored))) == cfg
    model = load_model(tmp_path / "run")
    vx, vy = digits.val.tensors()
    with torch.no_grad():
        assert (model(vx).argmax(1) == vy).float().mean() > 0.3  # trained, not random (10 %)


@pytest.mark.slow
def test_compile_matches_plain(digits, init, plain_run):
    """torch.compile (in place) keeps parameter names and computes the same losses. Slow: the
    compilation takes minutes on a loaded 2-core CPU."""
    losses, model = _steps(digits, init, compile=True)
    ref_losses, ref_model = plain_run
    assert losses == pytest.approx(ref_losses, rel=1e-3, abs=1e-4)
    assert set(model.state_dict()) == set(ref_model.state_dict())
    assert torch.equal(_val_preds(model, digits), _val_preds(ref_model, digits))


def test_stacked_models_train_like_separate_ones(digits):
    """vmap-stacked PGD-AT of two budgets = two separate PGD-AT steps (same init, SGD), per model."""
    from raydefense.models import build_classifier
    from raydefense.stacked import StackedModels, stacked_pgd_at_step

    torch.manual_seed(0)
    models = [build_classifier("small-cnn", digits.info) for _ in range(2)]
    separate = copy.deepcopy(models)
    x, y = digits.train.tensors()
    x, y = x[:64], y[:64]
    eps = torch.tensor([0.1, 0.25])
    stack = StackedModels(models)
    opt = torch.optim.SGD(list(stack.params.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    losses = stacked_pgd_at_step(stack, opt, x, y, eps, 3, eps / 4, rand_init=False)
    for i, m in enumerate(separate):
        xa = pgd_ce(m, x, y, float(eps[i]), 3, float(eps[i]) / 4, rand_init=False)
        loss = F.cross_entropy(m(xa), y)
        o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        o.zero_grad()
        loss.backward()
        o.step()
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-4)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(stack.state_dicts()[i][k], v, atol=1e-5, rtol=1e-4)
    assert float(losses[1]) > float(losses[0])  # the larger budget is the harder problem


def test_stacked_batchnorm_models_train_like_separate_ones(digits):
    """With BatchNorm, each stacked model keeps its own running statistics: after two PGD-AT steps
    (attack in eval mode, update in train mode) weights and running mean/var equal separate training."""
    from raydefense.stacked import StackedModels, stacked_pgd, stacked_pgd_at_step

    def bn_cnn() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))

    torch.manual_seed(0)
    models = [bn_cnn() for _ in range(2)]
    separate = copy.deepcopy(models)
    x, y = digits.train.tensors()
    eps = torch.tensor([0.1, 0.25])
    stack = StackedModels(models).train()
    opt = torch.optim.SGD(list(stack.params.values()), lr=0.05, momentum=0.9)
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in separate]
    for batch in (slice(0, 64), slice(64, 128)):
        losses = stacked_pgd_at_step(stack, opt, x[batch], y[batch], eps, 3, eps / 4, rand_init=False)
        assert stack.training  # the attack's eval mode was undone
        for i, (m, o) in enumerate(zip(separate, ref_opts)):
            m.train()
            xa = pgd_ce(m, x[batch], y[batch], float(eps[i]), 3, float(eps[i]) / 4, rand_init=False)
            loss = F.cross_entropy(m(xa), y[batch])
            o.zero_grad()
            loss.backward()
            o.step()
            assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-4)
    for i, m in enumerate(separate):
        state = stack.state_dicts()[i]
        assert set(state) == set(m.state_dict())
        for k, v in m.state_dict().items():
            torch.testing.assert_close(state[k], v, atol=1e-5, rtol=1e-4)
        assert int(state["1.num_batches_tracked"]) == 2 and float(state["1.running_mean"].abs().sum()) > 0
    assert not torch.equal(stack.buffers["1.running_mean"][0], stack.buffers["1.running_mean"][1])
    # eval mode uses each model's own running statistics
    stack.eval()
    xa = stacked_pgd(stack, x[:32], y[:32], eps, 2, eps / 4, rand_init=False)
    assert not stack.training
    with torch.no_grad():
        for i, m in enumerate(separate):
            m.eval()
            torch.testing.assert_close(stack(xa)[i], m(xa[i]), atol=1e-4, rtol=1e-4)


def test_stacking_refuses_mixed_architectures(digits):
    from raydefense.models import build_classifier
    from raydefense.stacked import StackedModels

    with pytest.raises(UserError, match="one architecture"):
        StackedModels([build_classifier("small-cnn", digits.info), torch.nn.Linear(64, 10)])


def test_benchmark_sweep_extrapolation_packs_trials_like_tune():
    """benchmarks/run.py extrapolates a 2-epoch sweep: trials start in order on the first free slot."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parents[1] / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.makespan([6] + [20] * 9, 2) == 100  # the slot that gets 5 of the 9 long trials
    assert bench.makespan([20] * 9 + [6], 2) == 100 and bench.makespan([10, 10], 1) == 20
    trial = [{"done_training": False, "time_this_iter_s": 3.0, "time_total_s": 3.0},
             {"done_training": False, "time_this_iter_s": 1.0, "time_total_s": 4.0},
             {"done_training": True, "time_this_iter_s": 0.5, "time_total_s": 4.5}]
    assert bench.extrapolate_trial(trial, 20) == pytest.approx(4.5 + 18 * 1.0)  # warm-up counted once
