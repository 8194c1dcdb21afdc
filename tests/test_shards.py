"""Batch-sharded CPU attacks (raydefense/attacks/shards.py) compute exactly what the unsharded
attack computes, on parallel single-threaded workers; no timings here (benchmarks/run.py)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from raydefense.attacks import pgd_ce, pgd_ce_until_fooled
from raydefense.attacks.shards import attack_shards, auto_shards, cpu_attack_shards, cpu_threads_as_shards, sharded
from raydefense.config import TrainConfig
from raydefense.methods.baselines import trades_adversary
from raydefense.train import fit

EPS = 0.25


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits.test.tensors()
    return x[:64], y[:64]


ATTACKS = {
    "pgd_ce": lambda m, x, y, g: pgd_ce(m, x, y, EPS, 10, generator=g),
    "pgd_ce_until_fooled": lambda m, x, y, g: pgd_ce_until_fooled(m, x, y, EPS, 10, generator=g),
    "trades": lambda m, x, y, g: trades_adversary(m, x, EPS, 10, EPS / 4, generator=g),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_sharded_attack_equals_the_unsharded_attack(natural_model, batch, name):
    attack = ATTACKS[name]
    x, y = batch
    with cpu_attack_shards(4):
        together = attack(natural_model, x, y, torch.Generator().manual_seed(0))
    alone = attack(natural_model, x, y, torch.Generator().manual_seed(0))
    assert together.shape == x.shape
    assert torch.equal(together, alone)  # same random starts, same per-sample steps
    # and it is an attack: it breaks the natural model on most of the batch
    with torch.no_grad():
        assert (natural_model(together).argmax(1) == y).float().mean() < 0.5


def test_shards_run_on_parallel_single_threaded_workers_with_the_callers_autocast(batch):
    x, _ = batch
    seen: list[tuple[int, int, bool]] = []
    lock = threading.Lock()
    both_started = threading.Barrier(2, timeout=10)  # fails unless the two shards run at the same time

    def record(xs):
        both_started.wait()
        with lock:
            seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_autocast_enabled("cpu")))
        return xs * 2

    torch.set_num_threads(2)
    with cpu_attack_shards(2), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sharded(record, [x])
    assert torch.equal(out, x * 2)
    assert len({ident for ident, _, _ in seen}) == 2
    assert all(threads == 1 and amp for _, threads, amp in seen)
    assert torch.get_num_threads() == 2  # restored


def test_a_failing_shard_raises_and_restores_the_thread_count(batch):
    x, _ = batch

    def fail_second(xs):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("shard failed")
        return xs

    torch.set_num_threads(2)
    with cpu_attack_shards(2), pytest.raises(RuntimeError, match="shard failed"):
        sharded(fail_second, [x])
    assert torch.get_num_threads() == 2


def test_small_batches_and_nested_attacks_run_inline(batch):
    x, _ = batch
    calls: list[int] = []

    def inner(xs):
        calls.append(len(xs))
        return xs

    def outer(xs):
        assert attack_shards() == 1  # inside a shard, attacks do not shard again
        return sharded(inner, [xs])

    with cpu_attack_shards(4):
        sharded(inner, [x[:10]])  # 10 samples: fewer than 2 shards' worth
        assert calls == [10]
        calls.clear()
        sharded(outer, [x])
    assert sorted(calls) == [16, 16, 16, 16]
    assert attack_shards() == 1  # the setting ends with its block


def test_fit_with_two_threads_trains_the_same_model_as_one_thread(tmp_path, digits):
    cfg = TrainConfig(method="pgd-at", epochs=2, eps_warmup_epochs=0, attack_steps=3, val_attack_steps=3, device="cpu")
    seen: list[tuple[int, int]] = []

    def during_training(_metrics, _out):  # called by fit at each epoch's end, inside its loop
        seen.append((attack_shards(), torch.get_num_threads()))

    one = fit(cfg, tmp_path / "one", splits=digits)
    two = fit(dataclasses.replace(cfg, threads=2), tmp_path / "two", splits=digits, reporter=during_training)
    assert seen == [(2, 1), (2, 1)]  # the small CNN is sharded automatically, other ops single-threaded
    assert [h["train_loss"] for h in one.history] == pytest.approx([h["train_loss"] for h in two.history], rel=1e-4)
    assert two.history[-1]["train_loss"] < two.history[0]["train_loss"]
    assert two.best["val_robust_acc"] == pytest.approx(one.best["val_robust_acc"], abs=0.02)


def test_threads_as_shards_runs_other_ops_single_threaded_and_restores():
    torch.set_num_threads(2)
    with cpu_threads_as_shards(2):
        assert torch.get_num_threads() == 1 and attack_shards() == 2
    assert torch.get_num_threads() == 2 and attack_shards() == 1
    with cpu_threads_as_shards(1):  # one thread: nothing changes
        assert torch.get_num_threads() == 2 and attack_shards() == 1


def test_automatic_shards_only_for_small_models_on_a_cpu(digits):
    from raydefense.models import build_classifier

    small = sum(p.numel() for p in build_classifier("small-cnn", digits.info).parameters())
    large = sum(p.numel() for p in build_classifier("preact-resnet18", digits.info).parameters())
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert auto_shards(0, 4, cpu, small) == 4  # the measured regime: tiny convolutions on a CPU
    assert auto_shards(0, 4, cpu, large) == 1  # a large model keeps torch's intra-op threads
    assert auto_shards(3, 4, cpu, large) == 3  # an explicit request wins
    assert auto_shards(1, 4, cpu, small) == 1  # 1 turns it off
    assert auto_shards(4, 4, gpu, small) == 1  # never on a GPU


def test_negative_thread_or_shard_counts_are_refused(tmp_path, digits):
    from raydefense.errors import UserError

    for name in ("threads", "attack_shards"):
        with pytest.raises(UserError, match=name):
            fit(TrainConfig(method="pgd-at", epochs=1, **{name: -1}), tmp_path / name, splits=digits)
        assert not (tmp_path / name).exists()  # refused before anything is written
