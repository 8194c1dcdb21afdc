"""AFS stacking on two tiny extractors (no Ray needed: the sweep table is written by hand)."""

import json

import pytest
import torch

from raydefense import load_model
from raydefense.config import TrainConfig
from raydefense.errors import UserError
from raydefense.report import write_parquet
from raydefense.stack import AFSStack, MergerConfig, load_extractor, train_merger
from raydefense.stack_afs import run_stack
from raydefense.train import fit


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("sweep")
    rows = []
    for budget, dz in ((0, 9.0), (4, 5.0), (8, 3.0)):
        ckpt = root / "extractors" / f"b{budget}_s0"
        fit(TrainConfig(method="pgd-at", eps=budget * digits.info.eps_unit, epochs=2, attack_steps=2,
                        val_attack_steps=2), ckpt, splits=digits)
        rows.append({"budget": budget, "eps": budget * digits.info.eps_unit, "seed": 0, "clean_acc": 0.9,
                     "pgd10_acc": 0.1, "pgd20_acc": 0.1, "delta_z": dz, "checkpoint": str(ckpt), "status": "ok"})
    write_parquet(rows, root / "sweep.parquet")
    return root


def test_merger_trains_only_the_merger_through_the_whole_stack(sweep_dir, digits):
    extractors = [load_extractor(sweep_dir / "extractors" / f"b{b}_s0", torch.device("cpu"))[0] for b in (0, 4)]
    before = [p.clone() for e in extractors for p in e.parameters()]
    stack = AFSStack(extractors, 10)
    merger_before = stack.merger.weight.clone()
    best = train_merger(stack, digits, MergerConfig(alpha=0.5, epochs=1, attack_steps=2))
    after = [p for e in stack.extractors for p in e.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # extractors frozen
    assert not torch.equal(stack.merger.weight, merger_before)
    assert 0 <= best["val_pgd10_acc"] <= best["val_clean_acc"] <= 1
    imp = stack.importance()
    assert len(imp) == 2 and sum(imp) == pytest.approx(1.0) and all(i > 0 for i in imp)
    # the attack sees the whole stack: the input gradient of the stack differs from any extractor's
    x, y = digits.val.tensors()
    x = x[:8].requires_grad_(True)
    torch.nn.functional.cross_entropy(stack(x), y[:8]).backward()
    assert x.grad.abs().sum() > 0


def test_untrained_stack_is_the_logit_average_of_its_extractors(sweep_dir, digits):
    extractors = [load_extractor(sweep_dir / "extractors" / f"b{b}_s0", torch.device("cpu"))[0] for b in (0, 4, 8)]
    stack = AFSStack(extractors, 10).eval()
    x, _ = digits.test.tensors()
    with torch.no_grad():
        average = torch.stack([e(x[:32]) for e in extractors]).mean(0)
        assert torch.allclose(stack(x[:32]), average, atol=1e-5)


def test_stack_command_writes_checkpoint_and_table(sweep_dir, digits):
    outcome = run_stack(sweep_dir, select="0,4", alphas=[0.5, 1.0], merger=MergerConfig(epochs=1, attack_steps=2),
                        n=40, attacks="clean,pgd20,aa")
    kinds = [r["kind"] for r in outcome.rows]
    assert kinds == ["stack", "stack", "extractor", "extractor"]
    for r in outcome.rows:
        assert r["aa_acc"] <= r["pgd20_acc"] + 0.05 and r["pgd20_acc"] <= r["clean_acc"]
        assert r["tradeoff"] == pytest.approx((r["clean_acc"] + r["aa_acc"]) / 2)
    assert sum(r["importance"] for r in outcome.rows if r["kind"] == "extractor") == pytest.approx(1.0)
    assert (sweep_dir / "stacks" / "alpha_0.5" / "model.pt").is_file()
    config = json.loads((sweep_dir / "stack" / "config.json").read_text())
    assert config["kind"] == "afs-stack" and [e["budget"] for e in config["extractors"]] == [0, 4]
    model = load_model(sweep_dir / "stack")
    x, _ = digits.test.tensors()
    assert model(x[:5]).shape == (5, 10) and not model.training


def test_auto_selection_and_bad_requests(sweep_dir, tmp_path):
    from raydefense.stack_afs import choose, read_sweep

    sel = choose(read_sweep(sweep_dir), "auto", 0.05)
    # Delta_z 9, 5, 3 bends convexly at budget 4 (second difference +2 > tol 0.3): the concave run
    # down from budget 8 ends there.
    assert sel.kept == [4, 8]
    assert sel.reasons[0].startswith("dropped") and "+2" in sel.reasons[4]
    with pytest.raises(UserError, match="does not have"):
        choose(read_sweep(sweep_dir), "2..3", 0.05)
    with pytest.raises(UserError, match="sweep afs"):
        read_sweep(tmp_path)


def test_evaluate_cli_accepts_a_stack(sweep_dir):
    from raydefense.cli import main

    if not (sweep_dir / "stack").exists():
        run_stack(sweep_dir, select="0,4", alphas=[0.5], merger=MergerConfig(epochs=1, attack_steps=2), n=20,
                  attacks="clean,pgd20")
    main(["evaluate", str(sweep_dir / "stack"), "--attacks", "fgsm,pgd10", "--n", "30"])  # returns on success
    assert (sweep_dir / "stack" / "eval.parquet").is_file()
