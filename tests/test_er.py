"""ER-Classifier and ER-Detector: clipping, the Wasserstein estimate, class-wise KDE, the detector pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raydefense.config import TrainConfig
from raydefense.methods import MethodContext, build_method
from raydefense.methods.er import ERMinus, ERNet
from helpers import run_cli


def _method(digits, method="er", **options):
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, attack_steps=2, options=options)
    m = build_method(MethodContext(cfg, digits.info, torch.device("cpu"),
                                   generator=torch.Generator().manual_seed(0)))
    m.optimizers = m.configure_optimizers()
    return m


@pytest.mark.parametrize("method", ["er", "er-trades"])
def test_critic_weights_stay_within_the_clip(digits, method):
    # a huge critic learning rate pushes the weights far past the clip in one Adam step
    m = _method(digits, method, critic_lr=0.5, clip=0.01)
    x, y = digits.train.tensors()
    for i in range(3):
        out = m.train_step(x[64 * i:64 * (i + 1)], y[64 * i:64 * (i + 1)])
        weights = torch.cat([p.detach().flatten() for p in m.critic.parameters()])
        assert weights.abs().max() <= 0.01 + 1e-7
        assert (weights.abs() > 0.0099).float().mean() > 0.5  # the step really hit the bound: clipping acted
        assert np.isfinite(out["loss"]) and "critic_w" in out


class _RegularizationOnly(ERMinus):
    """er- with the classification loss switched off: only the critic and encoder updates act."""

    def classification_loss(self, x, y):
        return self.net(x).sum() * 0.0, x, {}


def _regularize(digits, encoder_lr, steps=30):
    torch.manual_seed(0)  # the regularizer's own Adam: its strength is encoder_lr, not lam
    cfg = TrainConfig(method="er-", options={"encoder_lr": encoder_lr, "reg_step": "separate"})
    m = _RegularizationOnly(MethodContext(cfg, digits.info, torch.device("cpu")))
    m.optimizers = m.configure_optimizers()
    with torch.no_grad():
        m.net.encoder.to_code.bias += 3.0  # start the codes far from the N(0, I) prior
    x, y = digits.train.tensors()
    vx, vy = (t[:300] for t in digits.val.tensors())
    before = m.epoch_diagnostics(vx, vy)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        m.train_step(x[idx], y[idx])
    return before, m.epoch_diagnostics(vx, vy)


def test_wasserstein_estimate_falls_in_a_short_run(digits):
    before, after = _regularize(digits, encoder_lr=5e-4)
    assert after["val_sliced_w"] < 0.6 * before["val_sliced_w"]  # exact sliced W1 to the prior falls
    _, frozen = _regularize(digits, encoder_lr=1e-12)  # same critic, encoder not regularized
    assert frozen["val_sliced_w"] > 0.9 * before["val_sliced_w"]
    # the critic's own estimate: it keeps finding a gap against the frozen encoder, not against the regularized one
    assert after["val_critic_w"] < 0.5 * frozen["val_critic_w"]


def _encoder_after_one_step(digits, lam, **options):
    m = _method(digits, "er", lam=lam, **options)
    x, y = digits.train.tensors()
    m.train_step(x[:64], y[:64])
    return torch.cat([p.detach().flatten() for p in m.net.encoder.parameters()])


@pytest.mark.parametrize("reg_step", ["joint", "shared"])
def test_lambda_scales_the_encoder_regularisation(digits, reg_step):
    """With one optimizer state for the encoder's CE and regularisation, lambda is the weight of
    the regulariser: the encoder's update is affine in lambda (same critic for every lambda > 0:
    its Adam step is scale-invariant). The old separate Adam moved the encoder the same for any lambda."""
    e = {lam: _encoder_after_one_step(digits, lam, reg_step=reg_step) for lam in (0.01, 1.0, 10.0)}
    small, large = (e[1.0] - e[0.01]).norm(), (e[10.0] - e[1.0]).norm()
    assert small > 0
    assert 6 < float(large / small) < 12, (float(small), float(large))  # affine: ratio 9 / 0.99


def test_er_loss_adv_only_is_the_papers_min_max(digits):
    x, y = digits.train.tensors()
    x, y = x[:32], y[:32]
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    losses = {}
    for kind in ("mean", "adv"):
        m = _method(digits, "er", er_loss=kind)
        with torch.no_grad():  # non-zero logits (the output layer starts at 0)
            m.net.classifier[-1].weight.normal_(0, 0.5)
        m.adversarial_examples = lambda xx, yy: x_adv  # a fixed "attack": compare the losses exactly
        loss, inputs, _ = m.classification_loss(x, y)
        with torch.no_grad():
            ce_clean = nn.functional.cross_entropy(m.net(x), y)
            ce_adv = nn.functional.cross_entropy(m.net(x_adv), y)
        losses[kind] = (float(loss.detach()), float(ce_clean), float(ce_adv))
        assert len(inputs) == 64  # both kinds regularize clean and adversarial codes
    loss, ce_clean, ce_adv = losses["adv"]
    assert loss == pytest.approx(ce_adv, rel=1e-5) and ce_adv != pytest.approx(ce_clean, rel=1e-3)
    loss, ce_clean, ce_adv = losses["mean"]
    assert loss == pytest.approx((ce_clean + ce_adv) / 2, rel=1e-5)


def test_kde_scores_training_codes_highest_under_their_own_class():
    from raydefense.detect.er_detector import ClassKDE

    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 1.0]])
    spread = np.array([0.3, 0.3, 1.2])  # class 2 is broad: CV must pick a wider bandwidth for it
    labels = np.repeat(np.arange(3), 60)
    feats = centers[labels] + rng.normal(size=(180, 3)) * spread[labels, None]
    kde = ClassKDE().fit(feats, labels)
    scores = np.stack([kde.score(feats, np.full(180, c)) for c in range(3)], 1)
    assert (scores.argmax(1) == labels).mean() > 0.97
    assert kde.chosen[2] > kde.chosen[0] and kde.chosen[2] > kde.chosen[1]


class _PlaneEncoder(nn.Module):
    """Code = the two input values; the 'hidden mean' = their mean."""

    def forward(self, x):
        return x.flatten(1)

    def code_and_hidden(self, x):
        z = x.flatten(1)
        return z, z.mean(1, keepdim=True)


def test_detector_pipeline_matches_a_hand_computed_example():
    from raydefense.detect.er_detector import DetectionData, detection_tables, split_indices

    # two classes on a line; the classifier says class 1 iff the first coordinate is positive
    classifier = nn.Linear(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        classifier.bias.zero_()
    net = ERNet(_PlaneEncoder(), classifier)
    gen = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.arange(n) % 2
        x = torch.stack([torch.where(y == 1, 3.0, -3.0), torch.zeros(n)], 1) + 0.3 * torch.randn(n, 2, generator=gen)
        return x.view(n, 1, 1, 2), y

    train_x, train_y = sample(200)
    test_x, test_y = sample(150)
    # "adversarial" test inputs of three known kinds, by index mod 3:
    # 0: far off the data (low density -> detected), 1: unchanged (undetectable, correct),
    # 2: moved onto the other class (undetectable, misclassified)
    kind = torch.arange(150) % 3
    adv = test_x.clone()
    adv[kind == 0] = torch.tensor([30.0, 30.0]).view(1, 1, 2)
    adv[kind == 2] = -test_x[kind == 2]
    data = DetectionData(train_x, train_y, test_x, test_y, {"toy": adv})
    rows = detection_tables(net, data, ["toy"], ["toy"], kinds=["er1", "er2"], seed=3)

    _, second = split_indices(150, 0.2, seed=3)
    k = kind.numpy()[second]
    n0, n1, n2 = (int((k == i).sum()) for i in range(3))
    expected = {"acc_adv": n0 / len(second), "acc_nadv": 1.0, "acc_cla": n1 / (n1 + n2),
                "acc_com": (n0 + n1) / len(second)}
    assert len(rows) == 2 and {r["detector"] for r in rows} == {"er1", "er2"}
    for r in rows:
        assert {key: r[key] for key in expected} == pytest.approx(expected)
        assert r["n_adv"] == len(second) == 120
        far_right = int(((k == 0) & (test_y.numpy()[second] == 1)).sum())  # far points are predicted class 1
        assert r["acc_plain"] == pytest.approx((n1 + far_right) / len(second))




def test_detect_cli_writes_the_table_and_refuses_other_checkpoints(digits, tmp_path, capsys):
    from raydefense.report import read_parquet
    from raydefense.train import fit

    ckpt = tmp_path / "er-"
    fit(TrainConfig(method="er-", epochs=1, val_attack_steps=1), ckpt, splits=digits)
    assert run_cli("detect", ckpt, "--train-attack", "fgsm", "--test-attacks", "fgsm,pgd", "--n", "60",
                "--features", "er1", "--tsne") == 0
    rows = read_parquet(ckpt / "detect.parquet")
    assert [(r["train_attack"], r["test_attack"]) for r in rows] == [("fgsm", "fgsm"), ("fgsm", "pgd")]
    assert all(0.0 <= r["acc_nadv"] <= 1.0 and r["n_adv"] == 48 for r in rows)
    assert (ckpt / "tsne_fgsm.png").stat().st_size > 1000

    nat = tmp_path / "nat"
    fit(TrainConfig(method="natural", epochs=1, val_attack_steps=1), nat, splits=digits)
    assert run_cli("detect", nat, "--n", "20") == 2
    assert "needs an er" in capsys.readouterr().err


