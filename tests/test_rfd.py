"""RFD: gradient reversal, domain-diversity draws, losses, detector routing and the route checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.config import TrainConfig
from raydefense.methods import MethodContext, build_method
from raydefense.methods.rfd import angular_distance, channel_kl, dependence_loss, grad_reverse
from raydefense.route import RoutedModel, SoftRouted


def make_rfd(digits, seed: int = 0, **options):
    cfg = TrainConfig(method="rfd", seed=seed, lr=0.05, eps_warmup_epochs=0, options=options)  # full budget at step 1
    gen = torch.Generator().manual_seed(seed)
    method = build_method(MethodContext(cfg, digits.info, torch.device("cpu"), steps_per_epoch=10, generator=gen))
    method.optimizers = method.configure_optimizers()
    return method


class Const(nn.Module):
    """A detector stub: the same logit for every input."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((len(x),), self.value)


def test_gradient_reversal_flips_the_gradient_reaching_e_nr(digits):
    rfd = make_rfd(digits)
    x, y = digits.train.tensors()
    with torch.no_grad():
        f = rfd.G(x[:32])

    def grads(reverse: bool):
        rfd.E_nr.zero_grad()
        z = rfd.E_nr(f)
        F.cross_entropy(rfd.C(grad_reverse(z, 0.5) if reverse else z), y[:32]).backward()
        return torch.cat([p.grad.flatten() for p in rfd.E_nr.parameters()])

    plain, reversed_ = grads(False), grads(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(reversed_, -0.5 * plain)


def test_drawn_attack_parameters_stay_in_range_and_vary(digits):
    rfd = make_rfd(digits)
    unit = digits.info.eps_unit
    draws = [rfd.draw_attack() for _ in range(40)]
    for d in draws:
        assert 8 * unit - 1e-9 <= d["eps"] <= 12 * unit + 1e-9
        assert 2 * unit - 1e-9 <= d["step_size"] <= 4 * unit + 1e-9
        assert d["steps"] in (8, 16, 24, 32)
    assert len({round(d["eps"], 6) for d in draws}) > 30
    assert len({d["steps"] for d in draws}) == 4
    # seeded: the same seed draws the same sequence
    again = make_rfd(digits)
    assert [again.draw_attack() for _ in range(40)] == draws


def test_train_step_logs_its_draw_and_reconstruction_falls(digits):
    torch.manual_seed(0)
    rfd = make_rfd(digits, steps_choices=(2,))
    x, y = digits.train.tensors()
    recon, draws = [], []
    for i in range(24):
        b = slice(64 * (i % 8), 64 * (i % 8 + 1))
        out = rfd.train_step(x[b], y[b])
        recon.append(out["loss_recon"])
        draws.append(out["attack_eps"])
        assert out["attack_steps"] == 2
        assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert len(set(draws)) == len(draws)
    assert sum(recon[-4:]) / 4 < 0.85 * sum(recon[:4]) / 4


def test_angular_loss_is_zero_for_identical_features_only():
    z = torch.randn(16, 32)
    assert float(angular_distance(z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(angular_distance(z, 3 * z)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(angular_distance(z, -z)) == pytest.approx(2.0, abs=1e-5)
    assert float(angular_distance(z, torch.randn(16, 32))) > 0.5


def test_dependence_terms_decrease_as_features_diverge():
    a = torch.randn(8, 10)
    near, far = a + 0.01 * torch.randn(8, 10), -3 * a
    assert float(channel_kl(a, a)) == pytest.approx(0.0, abs=1e-6)
    for form in ("exp-neg-kl", "neg-kl"):
        assert float(dependence_loss(a, far, form)) < float(dependence_loss(a, near, form))
    assert float(dependence_loss(a, a, "exp-neg-kl")) == pytest.approx(1.0)


def test_routing_follows_the_detector(digits, natural_model):
    robust = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = digits.test.tensors()[0][:32]
    with torch.no_grad():
        clean = RoutedModel(Const(-3.0), robust, natural_model)(x)
        flagged = RoutedModel(Const(3.0), robust, natural_model)(x)
        torch.testing.assert_close(clean, natural_model(x))
        torch.testing.assert_close(flagged, robust(x))
        # the soft surrogate approaches the hard router's distribution as the temperature falls
        soft = SoftRouted(RoutedModel(Const(-3.0), robust, natural_model), 0.01)(x)
        torch.testing.assert_close(soft.softmax(1), natural_model(x).softmax(1), atol=1e-4, rtol=0)
        half = SoftRouted(RoutedModel(Const(0.0), robust, natural_model), 1.0)(x).softmax(1)
        torch.testing.assert_close(half, (robust(x).softmax(1) + natural_model(x).softmax(1)) / 2)


def test_route_checkpoint_is_self_contained(digits, natural_ckpt, tmp_path):
    import shutil

    from raydefense import load_model
    from raydefense.errors import UserError
    from raydefense.route import build_route
    from raydefense.train import fit

    rfd_dir = tmp_path / "rfd"
    fit(TrainConfig(method="rfd", epochs=1, val_attack_steps=1, options={"steps_choices": [2]}), rfd_dir,
        splits=digits)
    copy = tmp_path / "nat"
    shutil.copytree(natural_ckpt, copy)
    build_route(rfd_dir, copy, tmp_path / "route")
    with pytest.raises(UserError):
        build_route(copy, copy, tmp_path / "bad")  # not an rfd checkpoint
    shutil.rmtree(rfd_dir)
    shutil.rmtree(copy)  # the route checkpoint needs neither source any more
    routed = load_model(tmp_path / "route")
    assert isinstance(routed, RoutedModel)
    x = digits.test.tensors()[0][:64]
    with torch.no_grad():
        flags = routed.flags(x)
        expected = torch.where(flags[:, None], routed.robust(x), routed.natural(x))
        torch.testing.assert_close(routed(x), expected)


def test_route_cli_refuses_a_non_rfd_checkpoint(natural_ckpt, tmp_path, capsys):
    from raydefense.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["route", str(natural_ckpt), str(natural_ckpt), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "not an rfd checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
