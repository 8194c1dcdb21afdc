"""AFD: projection discriminator, spectral norm, the three updates, a short run; curves and AUC."""

from __future__ import annotations

import pytest
import torch

from raydefense.config import TrainConfig
from raydefense.methods import MethodContext, build_method
from raydefense.methods.afd import ProjectionDiscriminator, discriminator_accuracy
from helpers import run_cli


def _method(digits, **options):
    cfg = TrainConfig(method="afd-dcgan", attack_steps=2, eps_warmup_epochs=0, options=options)  # full budget at step 1
    method = build_method(MethodContext(cfg, digits.info, torch.device("cpu"),
                                        generator=torch.Generator().manual_seed(0)))
    method.optimizers = method.configure_optimizers()
    return method


def _groups(method) -> dict[str, dict[str, torch.Tensor]]:
    f = {n: p.detach().clone() for n, p in method.model.named_parameters() if not n.startswith("head.")}
    c = {n: p.detach().clone() for n, p in method.model.head.named_parameters()}
    d = {n: p.detach().clone() for n, p in method.disc.named_parameters()}
    return {"F": f, "C": c, "D": d}


def _changed(before, after) -> set[str]:
    return {g for g in before if any(not torch.equal(before[g][n], after[g][n]) for n in before[g])}


def test_projection_term_makes_the_output_depend_on_the_label():
    torch.manual_seed(0)
    disc = ProjectionDiscriminator(16, 10, width=8).eval()  # eval: no power iteration between calls
    z = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    y3, y7 = torch.full((5,), 3), torch.full((5,), 7)
    with torch.no_grad():
        d3, d7 = disc(z, y3), disc(z, y7)
        h = torch.nn.functional.leaky_relu(disc.layers[1](torch.nn.functional.leaky_relu(disc.layers[0](z), 0.2)), 0.2)
        expected = ((disc.embed(y3) - disc.embed(y7)) * h).sum(1)  # only the projection term differs
    assert (d3 - d7).abs().mean() > 1e-3
    assert torch.allclose(d3 - d7, expected, atol=1e-6)


def test_spectral_norm_keeps_each_layers_largest_singular_value_near_one():
    torch.manual_seed(0)
    disc = ProjectionDiscriminator(32, 10, width=16)
    with torch.no_grad():
        for layer in disc.layers:
            layer.parametrizations.weight.original.mul_(5.0)  # raw weights far from norm 1
    raw = [float(torch.linalg.matrix_norm(layer.parametrizations.weight.original.detach(), ord=2)) for layer in disc.layers]
    assert min(raw) > 2.0
    z, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    for _ in range(30):  # power iterations happen in train-mode forwards
        disc(z, y)
    for layer in list(disc.layers) + [disc.embed]:
        sigma = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
        assert abs(sigma - 1.0) < 0.05


def test_each_update_changes_exactly_its_parameter_groups(digits):
    torch.manual_seed(0)
    method = _method(digits)
    x, y = digits.train.tensors()
    x, y = x[:64], y[:64]
    x_adv = method.adversarial(x, y)
    assert (x_adv - x).abs().max() <= method.ctx.eps + 1e-6

    before = _groups(method)
    method.update_classifier(x, y)
    mid = _groups(method)
    assert _changed(before, mid) == {"F", "C"}
    method.update_discriminator(x, x_adv, y)
    after_d = _groups(method)
    assert _changed(mid, after_d) == {"D"}
    method.update_features(x_adv, y)
    assert _changed(after_d, _groups(method)) == {"F"}
    assert all(p.requires_grad for p in method.disc.parameters())  # D is unfrozen again


def test_without_update_three_no_feature_optimizer_and_d_untouched_by_f(digits):
    method = _method(digits, update_features=False, form="wgan", gp_weight=1.0)
    assert set(method.optimizers) == {"classifier", "disc"}
    x, y = digits.train.tensors()
    metrics = method.train_step(x[:32], y[:32])
    assert "loss_f" not in metrics and metrics["gp"] >= 0


def test_discriminator_accuracy_and_h_divergence_by_hand():
    d_clean = torch.tensor([1.0, 2.0, -1.0, 3.0])  # 3/4 above 0
    d_adv = torch.tensor([-2.0, -1.0, 0.5, -3.0])  # 3/4 at or below 0
    assert discriminator_accuracy(d_clean, d_adv, "dcgan") == pytest.approx(0.75)
    # WGAN threshold: midpoint of the means (1.25 + -1.375) / 2 = -0.0625
    assert discriminator_accuracy(d_clean, d_adv, "wgan") == pytest.approx(0.75)


def test_short_afd_run_lowers_lc_and_confuses_the_discriminator(digits, tmp_path):
    from raydefense.train import fit

    def run(name, **options):
        cfg = TrainConfig(method="afd-dcgan", epochs=4, batch_size=64, attack_steps=3, val_attack_steps=2,
                          lr_schedule="constant", options=options)
        return fit(cfg, tmp_path / name, splits=digits).history

    afd = run("afd")
    passive = run("no-f", update_features=False)
    assert afd[-1]["train_loss_c"] < afd[0]["train_loss_c"] - 0.1
    # update 3 keeps the discriminator nearer chance (0.5) than a D nobody tries to fool (mean over
    # epochs: single epochs are noisy) and makes features less sensitive to the attack
    def mean(hist, key):
        return sum(h[key] for h in hist) / len(hist)

    assert mean(afd, "val_disc_acc") < mean(passive, "val_disc_acc") - 0.02
    assert afd[-1]["val_feature_sensitivity"] < passive[-1]["val_feature_sensitivity"]
    h = afd[-1]
    assert h["val_h_divergence"] == pytest.approx(2 * abs(2 * h["val_disc_acc"] - 1))


def test_curves_fall_with_eps_and_stay_in_the_ball(natural_model, digits):
    from raydefense.evaluate.curves import accuracy_curve, auc_table

    x, y = digits.test.tensors()
    x, y = x[:48], y[:48]
    rows = []
    for attack, eps in (("pgd", [0.0, 0.1, 0.3]), ("mim", [0.0, 0.1, 0.3]), ("pgd-l2", [0.0, 1.0, 3.0])):
        accs = accuracy_curve(natural_model, x, y, attack, eps, batch_size=48)
        assert accs[0] > 0.8 and accs[-1] < accs[0] - 0.5
        rows += [{"label": "nat", "attack": attack, "eps": e, "accuracy": a} for e, a in zip(eps, accs)]
    table = auc_table(rows)
    assert len(table) == 1 and 0 < table[0]["pgd"] < 1


def test_curves_cli_writes_tables_and_plot(natural_ckpt, tmp_path):
    from raydefense.report import read_parquet


    out = tmp_path / "c"
    assert run_cli("curves", natural_ckpt, "--attacks", "fgsm,pgd-l2", "--eps-list", "1/16,2/16",
                   "--l2-eps-list", "0.5", "--n", "20", "--out", out) == 0
    rows = read_parquet(out / "curves.parquet")
    assert {(r["attack"], r["eps"]) for r in rows} == {("fgsm", 0.0), ("fgsm", 1 / 16), ("fgsm", 2 / 16),
                                                      ("pgd-l2", 0.0), ("pgd-l2", 0.5)}
    assert (out / "curves.png").stat().st_size > 1000 and len(read_parquet(out / "auc.parquet")) == 1
    assert run_cli("curves", natural_ckpt, "--attacks", "cw") == 2


def test_apgd_ce_training_attack_stays_in_the_ball_and_leaves_global_rng_alone(digits):
    method = _method(digits, attack="apgd-ce")
    x, y = digits.train.tensors()
    x, y = x[:32], y[:32]
    state = torch.random.get_rng_state()
    x_adv = method.adversarial(x, y)
    assert torch.equal(torch.random.get_rng_state(), state)  # APGD reseeds the global RNG: forked away
    assert (x_adv - x).abs().max() <= method.ctx.eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert method.model.training  # the attack ran in eval mode and restored the mode
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy
        assert loss(method.model(x_adv), y) > loss(method.model(x), y)
