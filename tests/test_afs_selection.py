import torch

from raydefense.afs import delta_z, select_concave


def test_selection_drops_the_convex_kink_of_low_budgets():
    # Delta_z falls steeply for small budgets (convex kink), then decreases concavely.
    budgets = list(range(10))
    values = [10.0, 4.0, 2.5, 2.2, 2.1, 1.95, 1.75, 1.5, 1.2, 0.85]
    sel = select_concave(budgets, values)
    assert sel.kept == [2, 3, 4, 5, 6, 7, 8, 9]
    assert sel.reasons[0].startswith("dropped") and sel.reasons[1].startswith("dropped")
    assert all(sel.reasons[b].startswith("kept") for b in sel.kept)


def test_selection_on_a_concave_curve_keeps_everything_and_handles_uneven_grids():
    budgets = [0, 2, 3, 6]
    values = [5 - 0.1 * b * b for b in budgets]
    assert select_concave(budgets, values).kept == budgets
    assert select_concave([1, 2], [3.0, 1.0]).kept == [1, 2]


def test_selection_extends_down_from_the_largest_budget_until_a_convex_kink():
    # convex kinks at budgets 2 and 5 (second differences +1.5, +1.4) split 0..9 into the
    # candidate runs 0..2, 2..5 and 5..9; a run may end on a kink, since only interior points count.
    values = [5, 4, 3, 3.5, 3.2, 2.9, 4.0, 3.9, 3.6, 3.1]
    sel = select_concave(list(range(10)), values, rel_tol=0.0)
    assert sel.kept == [5, 6, 7, 8, 9]
    assert select_concave(list(range(5)), [1, 2, 1, 2, 1], rel_tol=0.0).kept == [2, 3, 4]


def test_selection_keeps_the_robust_budgets_even_when_a_longer_concave_run_sits_below():
    # digits' Delta_z of the sweep of 2026-12-01: concave (within tol) on 0..4 (5 budgets) and on
    # 6..9 (4 budgets), with a convex kink at 6 just above the tolerance. The longest run would keep
    # 0..4, the extractors with no robustness; the rule keeps the run at the top.
    values = [27.93, 31.08, 25.12, 20.25, 15.32, 12.46, 9.31, 7.53, 5.79, 4.92]
    sel = select_concave(list(range(10)), values)
    assert sel.kept == [6, 7, 8, 9]
    assert sel.reasons[6].startswith("kept: lower end") and "convex kink" in sel.reasons[6]
    assert sel.reasons[5].startswith("dropped: below the convex kink at budget 6")


def test_delta_z_grows_with_eps_and_is_zero_at_zero(natural_model, digits):
    x, _ = digits.val.tensors()
    x = x[:64]
    g = torch.Generator().manual_seed(0)
    small, large = delta_z(natural_model, x, 1 / 32, steps=5, generator=g), delta_z(natural_model, x, 4 / 16, steps=5, generator=g)
    assert delta_z(natural_model, x, 0.0) == 0.0
    assert 0 < small < large
    # PGD on the logit distance beats a random point in the ball
    with torch.no_grad():
        z0 = natural_model(x)
        noise = (x + (torch.rand_like(x) * 2 - 1) * (4 / 16)).clamp(0, 1)
        random_shift = float((natural_model(noise) - z0).norm(dim=1).mean())
    assert large > random_shift
