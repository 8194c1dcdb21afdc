"""LDAT: Gaussian-mixture head, Algorithm 1, the likelihood term, lambda schedules, rejection eval."""

import math

import pytest
import torch
from torch import nn

from raydefense.attacks.boundary import boundary_attack
from raydefense.config import TrainConfig
from raydefense.errors import UserError
from raydefense.evaluate.rejection import (REJECT_ATTACKS, deepfool, defense_success, evaluate_rejection,
                                           resolve_reject_attacks)
from raydefense.methods import MethodContext, build_method
from raydefense.methods.ldat import default_l2_budget, lambda_at
from raydefense.models.gaussian_mixture import GaussianMixtureHead, gm_predict
from helpers import run_cli


def test_head_softmax_is_gaussian_posterior_with_equal_priors():
    torch.manual_seed(0)
    head = GaussianMixtureHead(5, 4, margin=0.0).train()
    f, y = torch.randn(7, 5), torch.randint(0, 4, (7,))
    # posterior from the densities themselves: N(f; mu_k, I) / sum_j N(f; mu_j, I), prior 1/K cancels
    dens = torch.stack([torch.distributions.MultivariateNormal(mu, torch.eye(5)).log_prob(f)
                        for mu in head.means], 1).exp()
    posterior = dens / dens.sum(1, keepdim=True)
    assert torch.allclose(head(f, y).softmax(1), posterior, atol=1e-5)
    # a margin lowers the true class's posterior in training only
    head.margin = 0.5
    assert (head(f, y).softmax(1).gather(1, y[:, None]) < posterior.gather(1, y[:, None])).all()
    head.eval()
    assert torch.allclose(head(f, y).softmax(1), posterior, atol=1e-5)


class Linear2(nn.Module):
    """A linear 2-class model on 1x1x2 'images': class 0 iff x0 > x1."""

    def forward(self, x):
        flat = x.flatten(1)
        return torch.stack([flat[:, 0] - flat[:, 1], flat[:, 1] - flat[:, 0]], 1) * 100


def test_algorithm1_radius_grows_when_correct_shrinks_when_fooled_and_final_delta_in_budget():
    model = Linear2()
    x = torch.tensor([[0.9, 0.1], [0.9, 0.1]]).view(2, 1, 1, 2)
    y = torch.tensor([0, 1])  # sample 0 correctly classified far from the boundary, sample 1 misclassified
    x_adv, radius = boundary_attack(model, x, y, budget=0.05, steps=3, gamma=0.2, eps_init=0.01,
                                    return_radius=True)
    assert torch.allclose(radius, torch.tensor([0.01 * 1.2 ** 3, 0.01 * 0.8 ** 3]))
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.05 + 1e-6).all()
    # a point near the boundary: the walk crosses it, then the radius shrinks back
    x_near = torch.tensor([[0.52, 0.48]]).view(1, 1, 1, 2)
    _, r = boundary_attack(model, x_near, torch.tensor([0]), budget=10.0, steps=12, gamma=0.2,
                           eps_init=0.01, return_radius=True)
    assert 0.01 < float(r) < 0.01 * 1.2 ** 12
    # the final delta is clipped to the budget only at the end
    xb = torch.rand(16, 1, 8, 8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    xa, r = boundary_attack(net, xb, torch.randint(0, 10, (16,)), budget=0.3, steps=2, gamma=0.2,
                            eps_init=1.0, return_radius=True)
    norms = (xa - xb).flatten(1).norm(dim=1)
    assert (r > 0.6).all()  # the walk itself ran far outside the budget...
    assert (norms <= 0.3 + 1e-5).all() and (xa >= 0).all() and (xa <= 1).all()  # ...the output did not


def _saturated_gm_model() -> nn.Module:
    """Inputs x100 (normalisation std 0.01) -> GM head with centroids 100 * e_k: a one-hot input
    sits on its centroid with a logit gap of 10^4, far above float32 softmax's ~100, so its CE
    input gradient is exactly 0 (a saturated head, as when trained centroids grow apart)."""
    from raydefense.models import Classifier

    class Flat(nn.Module):
        out_dim = 64

        def forward(self, x):
            return x.flatten(1)

    torch.manual_seed(0)
    head = GaussianMixtureHead(64, 10)
    with torch.no_grad():
        head.means.copy_(torch.eye(10, 64) * 100.0)
    info = type("Info", (), {"mean": (0.0,), "std": (0.01,)})()
    return Classifier(Flat(), head, info)


def test_algorithm1_moves_saturated_samples_instead_of_returning_zero_delta():
    model = _saturated_gm_model()
    y = torch.arange(10)
    x = torch.eye(10, 64).view(10, 1, 8, 8)  # each sample on its own centroid
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xr), y, reduction="sum"), xr)
    assert float(g.abs().max()) == 0.0  # precondition: CE saturated
    x_adv = boundary_attack(model, x, y, budget=2.0, steps=5, gamma=0.2, eps_init=1.0)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms > 0.5).all(), norms  # the old walk returned delta = 0 for every sample
    _, stats = boundary_attack(model, x, y, budget=2.0, steps=5, return_stats=True)
    assert stats["zero_delta"] == 0.0 and stats["margin_fallback"] > 0
    # a constant model has no gradient at all: the walk still moves, in a random direction
    const = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        const[1].weight.zero_()
    xa, st = boundary_attack(const, torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), budget=1.0,
                             steps=2, generator=torch.Generator().manual_seed(0), return_stats=True)
    assert st["random_fallback"] == 1.0 and st["zero_delta"] == 0.0


def test_ldat_default_config_trains_on_digits_with_finite_loss_and_live_features(digits):
    """TrainConfig's defaults (SGD lr 0.1, 10-step attack): without the gradient clip every ReLU
    feature died within the first epoch (constant 11.7 % model) or the loss went NaN."""
    cfg = TrainConfig(method="ldat", eps_warmup_epochs=0)
    torch.manual_seed(0)
    m = build_method(MethodContext(cfg, digits.info, torch.device("cpu"), generator=torch.Generator().manual_seed(0)))
    m.optimizers = m.configure_optimizers()
    x, y = digits.train.tensors()
    outs = [m.train_step(x[i:i + 128], y[i:i + 128]) for i in range(0, 128 * 8, 128)]
    assert all(math.isfinite(o["loss"]) for o in outs), [o["loss"] for o in outs]
    assert all(o["loss"] < 1e3 for o in outs), [o["loss"] for o in outs]
    vx, vy = digits.val.tensors()
    with torch.no_grad():
        f = m.model.features(vx)
        acc = float((m.model(vx).argmax(1) == vy).float().mean())
    assert (f.abs().sum(1) > 0).float().mean() > 0.9  # features alive
    assert acc > 0.3, acc
    assert outs[-1]["adv_l2"] > 0 and outs[-1]["zero_delta"] < 0.5


def test_l2_budgets_follow_the_training_eps(digits):
    m = build_method(MethodContext(TrainConfig(method="ldat", eps=3 / 16), digits.info, torch.device("cpu")))
    scale = (3 / 16) / (8 / 255) * (64 / 3072) ** 0.5
    assert m.l2_budget == pytest.approx(1.5 * scale) and m.eps_init == pytest.approx(scale)
    assert m.l2_budget == pytest.approx(1.29, abs=0.01)  # docs/ldat.md's figure at 3/16


def _ldat(digits, **options):
    cfg = TrainConfig(method="ldat", lr=0.01, attack_steps=3, epochs=5, eps_warmup_epochs=0, options=options)
    torch.manual_seed(0)
    m = build_method(MethodContext(cfg, digits.info, torch.device("cpu"), generator=torch.Generator().manual_seed(0)))
    m.optimizers = m.configure_optimizers()
    return m


def test_likelihood_term_pulls_features_to_their_centroid(digits):
    x, y = digits.train.tensors()
    xb, yb = x[:128], y[:128]

    def dist_after(lambda_init):
        m = _ldat(digits, lambda_init=lambda_init, lambda_schedule="constant", max_grad_norm=0)  # the loss alone
        for _ in range(15):
            m.train_step(xb, yb)
        with torch.no_grad():
            f = m.model.features(xb)
            return float((f - m.model.head.means[yb]).norm(dim=1).mean())

    m0 = _ldat(digits)
    with torch.no_grad():
        start = float((m0.model.features(xb) - m0.model.head.means[yb]).norm(dim=1).mean())
    with_lkd, without = dist_after(3.0), dist_after(0.0)  # CE alone pulls too, more weakly
    assert with_lkd < 0.6 * start, (start, with_lkd)
    assert with_lkd < 0.9 * without, (with_lkd, without)


def test_lambda_schedules_first_and_last_epoch():
    T = 10
    assert lambda_at("linear-up", 2.0, 0, T) == pytest.approx(2.0 / T)
    assert lambda_at("linear-up", 2.0, T - 1, T) == pytest.approx(2.0)
    assert lambda_at("linear-down", 2.0, 0, T) == pytest.approx(2.0)
    assert lambda_at("linear-down", 2.0, T - 1, T) == pytest.approx(0.0)
    assert lambda_at("constant", 2.0, 0, T) == lambda_at("constant", 2.0, T - 1, T) == 2.0
    with pytest.raises(UserError):
        lambda_at("cosine", 1.0, 0, T)


def test_ldat_train_step_lowers_loss_and_ablation_attacks_run(digits):
    x, y = digits.train.tensors()
    m = _ldat(digits, lambda_schedule="constant")
    losses = [m.train_step(x[:128], y[:128])["loss"] for _ in range(20)]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert m.l2_budget == pytest.approx(default_l2_budget(digits.info))
    # 1.5 scaled from CIFAR-10 (8/255, 3072 dims) to digits (eps 1/4, 64 dims)
    assert m.l2_budget == pytest.approx(1.5 * (0.25 / (8 / 255)) * (64 / 3072) ** 0.5)
    for attack in ("pgd-ce-l2", "pgd-kl-linf"):
        out = _ldat(digits, attack=attack).train_step(x[:32], y[:32])
        assert math.isfinite(out["loss"]) and out["adv_l2"] > 0
    with pytest.raises(UserError):
        _ldat(digits, beta=1.5)


def test_gm_predict_distance_and_rejection(digits):
    m = _ldat(digits)
    model = m.model.eval()
    x, _ = digits.val.tensors()
    out = gm_predict(model, x[:16], threshold=0.6)
    with torch.no_grad():
        f = model.features(x[:16])
    expected = (f - model.head.means[out["pred"]]).norm(dim=1)
    assert torch.allclose(out["distance"], expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(out["rejected"], out["confidence"] < 0.6)


def test_defense_success_and_adaptive_attack_beats_oblivious_on_rejection(natural_model, digits):
    pred = torch.tensor([0, 1, 2, 3])
    rej = torch.tensor([False, True, False, True])
    assert defense_success(pred, rej, torch.tensor([0, 0, 0, 3])).tolist() == [True, True, False, True]
    x, y = digits.test.tensors()
    x, y = x[:40], y[:40]
    attacks = resolve_reject_attacks("pgd20,adaptive-linf")
    assert attacks[0] is REJECT_ATTACKS["clean"]
    # a very high threshold: oblivious PGD leaves many low-confidence errors that get rejected
    rows, results = evaluate_rejection(natural_model, x, y, attacks, linf_eps=3 / 16, l2_eps=0.4, threshold=0.99)
    by = {r["attack"]: r for r in rows}
    assert by["adaptive-linf"]["defense_success"] <= by["pgd20"]["defense_success"]
    assert by["worst-all"]["defense_success"] <= min(by["pgd20"]["defense_success"],
                                                     by["adaptive-linf"]["defense_success"])
    for r in results:  # the per-sample definition, recomputed by hand
        assert r.row(40)["defense_success"] == pytest.approx(float((r.rejected | r.correct).float().mean()))
    with pytest.raises(UserError):
        resolve_reject_attacks("nope")


def test_batched_deepfool_matches_torchattacks(natural_model, digits):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits.test.tensors()
    x, y = x[:6], y[:6]
    ours = deepfool(natural_model, x, y, steps=10)
    ref = torchattacks.DeepFool(natural_model, steps=10, overshoot=0.02)(x, y)
    natural_model.zero_grad(set_to_none=True)  # torchattacks' backward passes fill weight grads
    assert torch.allclose(ours, ref, atol=1e-4)
    with torch.no_grad():  # every sample walked to (or past) the nearest boundary: top-2 logits tie
        z = natural_model(ours)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        assert (z_y - z.scatter(1, y[:, None], -1e9).max(1).values < 1e-2).all()
        assert ((ours - x).flatten(1).norm(dim=1) > 0.05).all()


def test_reject_cli_writes_parquet_and_refuses_bad_threshold(natural_ckpt, tmp_path, capsys):
    import pyarrow.parquet as pq



    assert run_cli("reject", natural_ckpt, "--n", "12", "--attacks", "pgd20,deepfool", "--out", tmp_path) == 0
    rows = pq.read_table(tmp_path / "reject.parquet").to_pylist()
    assert [r["attack"] for r in rows] == ["clean", "pgd20", "deepfool", "worst-oblivious", "worst-all"]
    assert all(r["n"] == 12 and r["threshold"] == 0.6 for r in rows)
    capsys.readouterr()
    assert run_cli("reject", natural_ckpt, "--threshold", "1.5") == 2
    assert "threshold" in capsys.readouterr().err
