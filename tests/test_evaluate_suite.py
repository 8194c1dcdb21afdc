"""The evaluation suite: every sanity flag trips on a model (or result) that deserves it and stays
quiet on one that does not; normalized AUC; minimum-norm budgets; sharded == single-process;
resume from the cache; the CLI (evaluate with sweeps, compare)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from raydefense.errors import UserError
from raydefense.evaluate import runner
from raydefense.evaluate.attacks import resolve_attacks, sanity_probes
from raydefense.evaluate.runner import AttackResult, EvalResult, run_attacks, sanity_flags, shard_bounds
from raydefense.evaluate.sweeps import normalized_auc
from helpers import run_cli

EPS = 3 / 16


class Quantized(nn.Module):
    """Gradient masking by construction: rounding the input has zero gradient everywhere."""

    def __init__(self, inner: nn.Module, levels: int = 2):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x):
        return self.inner(torch.round(x * self.levels) / self.levels)


class Noisy(nn.Module):
    """A randomized defense: Gaussian noise on the input at every forward pass."""

    def __init__(self, inner: nn.Module, sigma: float = 0.1):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn_like(x))


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits.test.tensors()
    return x[:64], y[:64]


def codes(result: EvalResult) -> set[str]:
    return {f["code"] for f in result.flag_details}


def test_normalized_auc_matches_hand_computation():
    # trapezoids: 0.1 * (1 + 0.5) / 2 + 0.1 * (0.5 + 0) / 2 = 0.1, over the range 0.2 -> 0.5
    assert normalized_auc([0.2, 0.0, 0.1], [0.0, 1.0, 0.5]) == pytest.approx(0.5)
    assert normalized_auc([0, 1 / 16, 3 / 16], [1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert normalized_auc([0, 0.1, 0.3], [1.0, 0.0, 0.0]) == pytest.approx(0.05 / 0.3)
    assert normalized_auc([0.0, 0.1, 0.4], [1.0, 0.8, 0.0]) == pytest.approx(0.21 / 0.4)  # uneven: 0.09 + 0.12
    with pytest.raises(ValueError):
        normalized_auc([0.1], [1.0])


def test_flags_quiet_on_natural_model(natural_model, data):
    x, y = data
    res = run_attacks(natural_model, x, y, resolve_attacks("fgsm,pgd10,pgd20,aa,square"), EPS, 64, 0,
                      probes=sanity_probes())
    assert res.flags == [], res.flags
    acc = {r.attack: r.accuracy for r in res.results}
    assert acc["clean"] > 0.9 and acc["pgd20"] < 0.2 and acc["aa"] <= acc["pgd20"] + 1 / 64
    assert res.diagnostics["zero_grad_fraction"] == 0 and res.diagnostics["forward_max_diff"] == 0


def test_quantized_model_is_flagged(natural_model, data):
    x, y = data
    res = run_attacks(Quantized(natural_model), x, y, resolve_attacks("fgsm,pgd10,square"), EPS, 64, 0,
                      probes=sanity_probes())
    assert {"gradients", "large-eps", "black-box"} <= codes(res), res.flags
    assert res.by_name()["pgd10"].accuracy > 0.8  # the masked number a flagless report would have shown


def test_randomized_model_is_flagged(natural_model, data):
    x, y = data
    quiet = run_attacks(natural_model, x, y, resolve_attacks("clean"), EPS, 64, 0)
    noisy = run_attacks(Noisy(natural_model), x, y, resolve_attacks("clean"), EPS, 64, 0)
    assert "randomized" not in codes(quiet) and "randomized" in codes(noisy)


def _result(acc: dict[str, tuple[float, str, int | None, float]], n: int = 100) -> EvalResult:
    """A result with given accuracies: name -> (accuracy, kind, steps, eps)."""
    results, probes = [], []
    for name, (a, kind, steps, eps) in acc.items():
        correct = torch.arange(n) < round(a * n)
        params = {"restarts": 1} if steps else {}
        r = AttackResult(name, eps, correct, 0.0, params, "linf", kind, steps)
        (probes if kind == "probe" else results).append(r)
    res = EvalResult(results, n, probes=probes, diagnostics={"eps": EPS, "num_classes": 10})
    res.flag_details = sanity_flags(res)
    return res


def test_steps_eps_and_autoattack_flags_on_constructed_results():
    ok = {"clean": (0.95, "none", None, 0.0), "pgd10": (0.60, "white-box", 10, EPS),
          "pgd100": (0.58, "white-box", 100, EPS), "aa": (0.55, "reference", None, EPS),
          "probe-pgd10@eps/2": (0.85, "probe", 10, EPS / 2), "probe-pgd10@eps": (0.60, "probe", 10, EPS),
          "probe-pgd10@2eps": (0.10, "probe", 10, 2 * EPS), "probe-pgd10@0.5": (0.0, "probe", 10, 0.5)}
    assert codes(_result(ok)) == set()
    assert "steps" in codes(_result({**ok, "pgd100": (0.70, "white-box", 100, EPS)}))
    assert "eps-monotone" in codes(_result({**ok, "probe-pgd10@2eps": (0.75, "probe", 10, 2 * EPS)}))
    assert "aa-above-pgd" in codes(_result({**ok, "aa": (0.65, "reference", None, EPS)}))
    assert "above-clean" in codes(_result({**ok, "fgsm": (0.99, "white-box", None, EPS)}))
    # one sample either way is noise, not a finding
    assert codes(_result({**ok, "pgd100": (0.61, "white-box", 100, EPS)})) == set()


def test_minimum_norm_attacks_count_only_within_budget(natural_model, data):
    x, y = data[0][:8], data[1][:8]
    tiny = run_attacks(natural_model, x, y, resolve_attacks("deepfool"), EPS, 8, 0, eps_l2=1e-3)
    big = run_attacks(natural_model, x, y, resolve_attacks("deepfool"), EPS, 8, 0, eps_l2=3.0)
    clean = tiny.by_name()["clean"].correct
    assert torch.equal(tiny.by_name()["deepfool"].correct, clean)  # nothing fits in 1e-3
    assert big.by_name()["deepfool"].accuracy < clean.float().mean() - 0.5
    assert big.by_name()["deepfool"].eps == 3.0


def test_transfer_needs_a_surrogate():
    with pytest.raises(UserError, match="surrogate"):
        resolve_attacks("pgd10,transfer")
    assert [a.name for a in resolve_attacks("transfer", surrogate=nn.Identity())] == ["clean", "transfer-pgd20"]


def test_shard_bounds_are_whole_batches():
    assert shard_bounds(64, 16, 2) == [(0, 32), (32, 64)]
    assert shard_bounds(70, 16, 3) == [(0, 32), (32, 64), (64, 70)]
    assert shard_bounds(10, 16, 4) == [(0, 10)]


@pytest.mark.ray
def test_sharded_equals_single_process(ray_session, natural_model, data):
    x, y = data
    attacks = resolve_attacks("fgsm,pgd10,square,spsa")
    single = run_attacks(natural_model, x, y, attacks, EPS, 16, 3, probes=sanity_probes()[:1])
    sharded = run_attacks(natural_model, x, y, attacks, EPS, 16, 3, workers=2, probes=sanity_probes()[:1])
    for a, b in zip(single.results + single.probes, sharded.results + sharded.probes):
        assert a.attack == b.attack and torch.equal(a.correct, b.correct), a.attack
    assert torch.equal(single.worst_case(), sharded.worst_case()) and single.flags == sharded.flags


def test_resume_skips_cached_shards(natural_model, data, tmp_path, monkeypatch):
    x, y = data
    attacks = resolve_attacks("fgsm,pgd10")
    first = run_attacks(natural_model, x, y, attacks, EPS, 32, 0, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.json"))) == 3 * 1  # clean, fgsm, pgd10; one shard each

    def boom(*a, **k):
        raise AssertionError("cached work was recomputed")

    monkeypatch.setattr(runner, "run_span", boom)
    again = run_attacks(natural_model, x, y, attacks, EPS, 32, 0, cache_dir=tmp_path)
    assert all(torch.equal(a.correct, b.correct) for a, b in zip(first.results, again.results))
    with pytest.raises(AssertionError, match="recomputed"):  # another budget is another key
        run_attacks(natural_model, x, y, attacks, EPS / 2, 32, 0, cache_dir=tmp_path)


def test_cli_evaluate_with_sweeps_then_compare(natural_ckpt, tmp_path):


    out = tmp_path / "ev"
    assert run_cli("evaluate", natural_ckpt, "--n", "32", "--attacks", "fgsm,pgd10", "--eps-sweep", "0,1/16,3/16", "--sweep-attacks", "fgsm,pgd10",
               "--steps-sweep", "1,5", "--out", out) == 0
    rows = pq.read_table(out / "eval.parquet").to_pylist()
    assert {"attack", "eps", "accuracy", "n", "flags"} <= set(rows[0])
    meta = pq.read_schema(out / "eval.parquet").metadata
    assert b"flags" in meta and b"diagnostics" in meta
    auc = pq.read_table(out / "eps_auc.parquet").to_pylist()
    sweep = pq.read_table(out / "eps_sweep.parquet").to_pylist()
    pts = sorted((r["eps"], r["accuracy"]) for r in sweep if r["attack"] == "pgd10")
    assert [r for r in auc if r["attack"] == "pgd10"][0]["auc"] == pytest.approx(normalized_auc(*zip(*pts)))
    assert (out / "eps_sweep.png").stat().st_size > 1000 and (out / "steps_sweep.png").exists()
    report = (out / "report.md").read_text()
    assert "Accuracy vs eps" in report and "command" in report
    assert run_cli("compare", out, out, "--out", tmp_path / "cmp") == 0
    table = pq.read_table(tmp_path / "cmp" / "compare.parquet").to_pylist()
    assert len(table) == 2 and table[0]["pgd10"] == table[1]["pgd10"]
    assert (tmp_path / "cmp" / "compare_eps.png").exists()
    assert run_cli("evaluate", natural_ckpt, "--attacks", "transfer") == 2
    assert run_cli("evaluate", natural_ckpt, "--steps-sweep", "a,b") == 2
