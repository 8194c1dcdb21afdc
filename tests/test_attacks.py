import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import eval_mode, fgsm, pgd, pgd_ce, pgd_ce_until_fooled


@pytest.fixture(scope="module")
def test_batch(digits):
    x, y = digits.test.tensors()
    return x[:128], y[:128]


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("norm,eps", [("linf", 3 / 16), ("l2", 1.0)])
def test_pgd_stays_in_ball_and_range_and_lowers_accuracy(natural_model, test_batch, norm, eps):
    x, y = test_batch
    xa = pgd_ce(natural_model, x, y, eps, steps=10, norm=norm)
    delta = (xa - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert xa.min() >= 0 and xa.max() <= 1
    clean, adv = _acc(natural_model, x, y), _acc(natural_model, xa, y)
    assert clean > 0.85
    assert adv < clean - 0.3, (clean, adv)


def test_more_steps_do_not_weaken_pgd(natural_model, test_batch):
    x, y = test_batch
    eps = 1 / 16
    accs = [_acc(natural_model, pgd_ce(natural_model, x, y, eps, steps=s, generator=torch.Generator().manual_seed(0)), y)
            for s in (1, 5, 20)]
    assert accs[2] <= accs[1] + 0.02 <= accs[0] + 0.04


def test_fgsm_moves_every_free_pixel_by_eps(natural_model, test_batch):
    x, y = test_batch
    eps = 0.1
    xa = fgsm(natural_model, x, y, eps)
    free = (x > eps) & (x < 1 - eps)
    moved = (xa - x).abs()[free]
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], eps), atol=1e-6)
    assert (moved > 0).float().mean() > 0.5  # zero gradients only where the model ignores a pixel


class ModeRecorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.inner(x)


def test_attack_runs_in_eval_mode_and_restores_mode(natural_model, test_batch):
    x, y = test_batch
    model = ModeRecorder(natural_model)
    model.train()
    pgd_ce(model, x[:8], y[:8], 0.1, steps=3)
    assert model.modes == [False] * 3
    assert model.training  # restored
    model.eval()
    with pytest.raises(ZeroDivisionError):
        with eval_mode(model):
            model.train()  # even a mode change inside, or an error, ends with the old mode
            raise ZeroDivisionError
    assert not model.training


def test_attack_computes_no_weight_gradients(natural_model, test_batch):
    x, y = test_batch
    for p in natural_model.parameters():
        p.grad = None
    pgd_ce(natural_model, x[:16], y[:16], 0.1, steps=2)
    assert all(p.grad is None for p in natural_model.parameters())


def test_eps_zero_returns_input(natural_model, test_batch):
    x, y = test_batch
    assert torch.equal(pgd_ce(natural_model, x, y, 0.0, steps=5), x)


def test_at_least_as_strong_as_torchattacks(natural_model, test_batch):
    """The fast PGD must find adversarial examples at least as strong as the reference library's."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = test_batch
    eps = 1 / 16
    torch.manual_seed(0)
    ref = torchattacks.PGD(natural_model, eps=eps, alpha=eps / 4, steps=10, random_start=True)(x, y)
    ours = pgd_ce(natural_model, x, y, eps, steps=10, step_size=eps / 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_ref = F.cross_entropy(natural_model(ref), y)
        loss_ours = F.cross_entropy(natural_model(ours), y)
    assert _acc(natural_model, ours, y) <= _acc(natural_model, ref, y) + 0.03
    assert loss_ours >= 0.9 * loss_ref


class BatchSizeRecorder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.inner(x)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_until_fooled_breaks_everything_plain_pgd_breaks(natural_model, test_batch, norm, eps):
    """Evaluation PGD: at least as strong per sample as plain PGD, identical on the survivors."""
    x, y = test_batch
    plain = pgd_ce(natural_model, x, y, eps, steps=10, norm=norm, generator=torch.Generator().manual_seed(5))
    model = BatchSizeRecorder(natural_model)
    fast = pgd_ce_until_fooled(model, x, y, eps, steps=10, norm=norm, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain_ok = natural_model(plain).argmax(1) == y
        fast_ok = natural_model(fast).argmax(1) == y
    assert 0 < int(fast_ok.sum()) < len(y) - 10  # the budget leaves survivors and breaks many
    assert not (fast_ok & ~plain_ok).any()  # nothing plain PGD breaks survives here
    assert torch.allclose(fast[fast_ok], plain[fast_ok], atol=1e-6)  # survivors took plain PGD's path
    delta = (fast - x).flatten(1)
    bound = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bound.max() <= eps + 1e-5 and fast.min() >= 0 and fast.max() <= 1
    assert model.sizes[0] == len(y) and model.sizes[-1] < len(y)  # broken samples left the batch
    assert sum(model.sizes) < 0.8 * 10 * len(y)


def test_until_fooled_keeps_eval_mode_and_weight_grads_clean(natural_model, test_batch):
    x, y = test_batch
    model = ModeRecorder(natural_model)
    model.train()
    for p in natural_model.parameters():
        p.grad = None
    pgd_ce_until_fooled(model, x[:16], y[:16], 0.1, steps=3)
    assert model.modes and not any(model.modes) and model.training
    assert all(p.grad is None for p in natural_model.parameters())


def test_custom_objective_and_start_point(natural_model, test_batch):
    """The engine maximizes any objective; x_init is projected back into the ball."""
    x, _ = test_batch
    x = x[:16]
    with torch.no_grad():
        z0 = natural_model(x)

    def logit_shift(xa):
        return (natural_model(xa) - z0).norm(dim=1).sum()

    with eval_mode(natural_model):
        xa = pgd(logit_shift, x, 0.1, steps=5, rand_init=False, x_init=(x + 0.5).clamp(0, 1))
    assert (xa - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert logit_shift(xa) > 0
