"""Recipes for real datasets: seeded augmentation, LR schedules, --init-from, the papers' presets,
on tiny CIFAR-10 files in torchvision's own format (loaded through torchvision's CIFAR10)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli, trust_fabricated_cifar, write_cifar10_batches

from raydefense.augment import build_augmenter, parse_ops
from raydefense.checkpoint import WEIGHTS, load_method, safe_torch_load
from raydefense.cli.train import make_train_config
from raydefense.config import TrainConfig
from raydefense.data import Split, Splits, load_splits
from raydefense.errors import UserError
from raydefense.methods.baselines import Natural, PGDAT
from raydefense.presets import PRESETS, get_preset
from raydefense.train import fit, lr_multiplier


def _reference_crop(x: torch.Tensor, top: int, left: int, pad: int, mode: str, flip: bool) -> torch.Tensor:
    """What torchvision's RandomCrop(padding) + RandomHorizontalFlip would give for these draws."""
    padded = F.pad(x[None].float(), (pad,) * 4, mode="constant" if mode == "zeros" else "reflect")[0]
    h, w = x.shape[1:]
    out = padded[:, top:top + h, left:left + w]
    return (out.flip(-1) if flip else out).to(x.dtype)


@pytest.mark.parametrize("mode,dtype", [("zeros", torch.uint8), ("reflect", torch.float32)])
def test_crop_and_flip_are_torchvisions_and_keep_shape_and_dtype(mode, dtype):
    x = torch.randint(0, 256, (6, 3, 32, 32)).to(dtype)
    aug = build_augmenter("crop,flip", None, mode, "cifar10", (3, 32, 32))
    assert aug.padding == 4  # 4 px on 32x32
    draws = aug.for_epoch(seed=0, epoch=0, n=6, device=torch.device("cpu"))
    idx = torch.tensor([5, 0, 3])
    out = draws(x[idx], idx)
    assert out.shape == (3, 3, 32, 32) and out.dtype == dtype
    for row, i in enumerate(idx.tolist()):
        top, left = (draws.offsets[i] + 4).tolist()
        assert torch.equal(out[row], _reference_crop(x[i], top, left, 4, mode, bool(draws.flips[i])))


def test_augmentation_is_seeded_per_seed_and_epoch():
    aug = build_augmenter("crop,flip", None, "zeros", "cifar10", (3, 32, 32))
    x, idx = torch.rand(64, 3, 32, 32), torch.arange(64)
    cpu = torch.device("cpu")
    same = [aug.for_epoch(7, 2, 64, cpu)(x, idx) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], aug.for_epoch(8, 2, 64, cpu)(x, idx))
    assert not torch.equal(same[0], aug.for_epoch(7, 3, 64, cpu)(x, idx))
    draws = aug.for_epoch(7, 2, 64, cpu)
    assert 0 < int(draws.flips.sum()) < 64 and len({tuple(o) for o in draws.offsets.tolist()}) > 10


def test_no_flip_on_digit_datasets_and_auto_defaults():
    assert parse_ops("auto", "cifar10") == ("crop", "flip") and parse_ops("auto", "svhn") == ("crop",)
    for name in ("digits", "mnist", "fashion-mnist"):
        assert build_augmenter("auto", None, "zeros", name, (1, 28, 28)) is None  # off unless asked
    for name in ("digits", "mnist", "svhn"):
        with pytest.raises(UserError, match="must not be flipped"):
            parse_ops("crop,flip", name)
    with pytest.raises(UserError, match="unknown operation 'rotate'"):
        parse_ops("crop,rotate", "cifar10")
    # SVHN's default crops but never flips: every output is an unflipped crop of its input
    aug = build_augmenter("auto", None, "zeros", "svhn", (3, 32, 32))
    x, idx = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8), torch.arange(200)
    for epoch in range(3):
        draws = aug.for_epoch(0, epoch, 200, torch.device("cpu"))
        out = draws(x, idx)
        assert not bool(draws.flips.any())
        for i in range(0, 200, 37):
            top, left = (draws.offsets[i] + 4).tolist()
            assert torch.equal(out[i], _reference_crop(x[i], top, left, 4, "zeros", False))


def test_digits_default_training_batches_are_untouched(digits, monkeypatch, tmp_path):
    """Defaults on digits: the batches train_step sees are exactly the shuffled training images."""
    seen: list[torch.Tensor] = []
    original = Natural.train_step
    monkeypatch.setattr(Natural, "train_step", lambda self, x, y: (seen.append(x.clone()), original(self, x, y))[1])
    cfg = TrainConfig(method="natural", epochs=2, val_attack_steps=0)
    fit(cfg, tmp_path / "run", splits=digits)
    train_x, _ = digits.train.tensors()
    expected = []
    for epoch in range(2):
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        expected += [train_x[order[b:b + cfg.batch_size]] for b in range(0, len(train_x), cfg.batch_size)]
    assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_lr_schedule_values():
    total = 200 * 10  # 200 epochs of 10 batches
    piecewise = lr_multiplier("piecewise", total)
    assert [piecewise(e * 10) for e in (0, 99, 100, 149, 150, 199)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    trades = lr_multiplier("piecewise", 76 * 10, [74 * 10, 89 * 10, 99 * 10], 0.1)
    assert trades(73 * 10 + 9) == 1.0 and trades(74 * 10) == 0.1 and trades(75 * 10 + 9) == 0.1
    halving = lr_multiplier("piecewise", 40, [10, 30], 0.5)
    assert [halving(s) for s in (9, 10, 29, 30, 40)] == [1.0, 0.5, 0.5, 0.25, 0.25]
    cosine = lr_multiplier("cosine", 100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    assert cosine(25) == pytest.approx(0.5 * (1 + 2 ** -0.5))


def test_milestones_augmentation_and_resume_match_an_uninterrupted_run(digits, tmp_path):
    """lr at the end of each epoch follows the milestones; a run stopped after epoch 1 and resumed
    ends with the same weights (augmentation draws and schedule both resume)."""
    cfg = TrainConfig(method="natural", epochs=3, val_attack_steps=0, lr_milestones=[1, 2], lr_gamma=0.5,
                      augment="crop", lr=0.05)
    full = fit(cfg, tmp_path / "full", splits=digits)
    assert [h["lr"] for h in full.history] == pytest.approx([0.025, 0.0125, 0.0125])

    class Stop(Exception):
        pass

    def stop_after_first(metrics, _):
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, tmp_path / "cut", splits=digits, reporter=stop_after_first)
    resumed = fit(cfg, tmp_path / "cut", splits=digits)
    assert resumed.start_epoch == 1
    a = safe_torch_load(tmp_path / "full" / "trainer_state.pt")["modules"]["model"]
    b = safe_torch_load(tmp_path / "cut" / "trainer_state.pt")["modules"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    fit(cfg.replace(augment="none"), tmp_path / "plain", splits=digits)
    c = safe_torch_load(tmp_path / "plain" / "trainer_state.pt")["modules"]["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the crops did change what was trained


def test_init_from_copies_weights_and_refuses_a_mismatch(natural_ckpt, digits, tmp_path, capsys):
    from raydefense.methods import MethodContext, build_method
    from raydefense.warm_start import warm_start

    method = build_method(MethodContext(TrainConfig(method="pgd-at"), digits.info, torch.device("cpu")))
    source = safe_torch_load(natural_ckpt / WEIGHTS)["model"]
    assert not torch.equal(method.model.state_dict()["head.weight"], source["head.weight"])
    assert warm_start(method, natural_ckpt, "digits") == ["model"]
    assert all(torch.equal(method.model.state_dict()[k], v) for k, v in source.items())

    out = tmp_path / "warm"
    assert run_cli("train", "pgd-at", "--init-from", natural_ckpt, "--epochs", "1", "--val-attack-steps", "1",
                   "--attack-steps", "1", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["train"]["init_from"] == str(natural_ckpt.resolve())
    assert load_method(out).ctx.cfg.init_from == str(natural_ckpt.resolve())

    capsys.readouterr()
    bad = tmp_path / "bad"
    assert run_cli("train", "natural", "--init-from", natural_ckpt, "--arch", "preact-resnet18", "--epochs", "1",
                   "--out", bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --init-from {natural_ckpt.resolve()}: holds a small-cnn on digits, this run trains a "
                   f"preact-resnet18 on digits"]
    assert not bad.exists()  # refused before anything was written
    assert run_cli("train", "natural", "--init-from", tmp_path / "nowhere", "--out", bad) == 2
    assert "does not exist" in capsys.readouterr().err


def test_presets_fill_defaults_that_flags_override():
    cfg = make_train_config("pgd-at", {}, [], None, "rice2020-pgd-at")
    assert (cfg.dataset, cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == \
        ("cifar10", "preact-resnet18", 200, 128, 0.1, 0.9, 5e-4)
    assert (cfg.eps, cfg.attack_steps, cfg.attack_step_size) == (8 / 255, 10, 2 / 255)
    assert (cfg.lr_schedule, cfg.lr_milestones, cfg.augment, cfg.augment_pad_mode) == \
        ("piecewise", None, "crop,flip", "reflect")
    cfg = make_train_config("pgd-at", {"epochs": "3", "augment": "none"}, [], None, "rice2020-pgd-at")
    assert cfg.epochs == 3 and cfg.augment == "none" and cfg.lr == 0.1
    trades = make_train_config("trades", {}, ["beta=3"], None, "zhang2019-trades")
    assert trades.options == {"beta": "3"} and trades.arch == "wrn-34-10" and trades.weight_decay == 2e-4
    assert make_train_config("trades", {}, [], None, "zhang2019-trades").options == {"beta": 6.0}
    assert trades.lr_milestones == [74, 89, 99] and trades.attack_step_size == 0.007 and trades.epochs == 76
    with pytest.raises(UserError, match="is a pgd-at recipe, not trades"):
        make_train_config("trades", {}, [], None, "rice2020-pgd-at")
    with pytest.raises(UserError, match="unknown preset 'rice2021'"):
        make_train_config("pgd-at", {}, [], None, "rice2021")
    cited = {"rice2020-pgd-at": "locuslab/robust_overfitting", "afs-extractor": "Liu & Zhao",
             "afs-code-extractor": "anonymous1s8f2o/afs_code", "zhang2019-trades": "yaodongyu/TRADES"}
    assert set(PRESETS) == set(cited)
    for name, source in cited.items():  # every preset builds a valid config and cites its source
        preset = get_preset(name, PRESETS[name]().method)
        assert source in preset.source
        make_train_config(preset.method, {}, [], None, name)


def test_rice2020_preset_trains_on_cifar10_files(tmp_path, monkeypatch):
    """Two batches of the rice2020 preset (PreAct ResNet-18, crop+flip, PGD) on files in torchvision's
    CIFAR-10 format read through torchvision, with a trimmed validation split so it takes seconds."""
    trust_fabricated_cifar(monkeypatch)
    root = write_cifar10_batches(tmp_path / "data", per_batch=1002, n_test=4)  # 5010 train: 5000 val + 10
    cfg = make_train_config("pgd-at", {"data_dir": str(root), "epochs": "1", "batch_size": "5",
                                       "attack_steps": "2", "val_attack_steps": "1"}, [], None, "rice2020-pgd-at")
    splits = load_splits("cifar10", root)
    assert len(splits.train) == 10 and splits.train.images.dtype == torch.uint8
    small = Splits(splits.info, splits.train, Split(splits.val.images[:6], splits.val.labels[:6]), splits.test)
    seen: list[torch.Tensor] = []
    original = PGDAT.train_step
    monkeypatch.setattr(PGDAT, "train_step", lambda self, x, y: (seen.append(x.clone()), original(self, x, y))[1])
    result = fit(cfg, tmp_path / "run", splits=small)
    assert len(seen) == 2 and all(x.shape == (5, 3, 32, 32) for x in seen)
    train_x, _ = splits.train.tensors()
    assert not any(torch.equal(seen[0], train_x[i:i + 5]) for i in range(6))  # augmented, not raw
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["arch"] == "preact-resnet18" and stored["train"]["augment_pad_mode"] == "reflect"
    assert result.history[0]["lr"] == 0.1 * 0.01  # both decays fall inside one epoch of 2 steps


@pytest.mark.slow  # ~11 s on one thread: validation runs over the fixed 5000-image CIFAR val split
def test_train_cli_with_a_preset_on_cifar10_files(tmp_path, monkeypatch):
    trust_fabricated_cifar(monkeypatch)
    root = write_cifar10_batches(tmp_path / "data", per_batch=1002, n_test=4)
    out = tmp_path / "run"
    assert run_cli("train", "pgd-at", "--preset", "rice2020-pgd-at", "--data-dir", root, "--arch", "small-cnn",
                   "--epochs", "1", "--batch-size", "5", "--attack-steps", "1", "--val-attack-steps", "0",
                   "--out", out) == 0
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["arch"] == "small-cnn" and train["weight_decay"] == 5e-4 and train["augment"] == "crop,flip"


def test_bad_recipe_input_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    for argv, message in [
        (("train", "natural", "--augment", "crop,flip"), "error: augment: digits must not be flipped"),
        (("train", "natural", "--lr-milestones", "-1"), "error: lr_milestones must be epochs >= 0"),
        (("train", "natural", "--lr-gamma", "0"), "error: lr_gamma must be > 0"),
        (("train", "pgd-at", "--preset", "nope"), "error: unknown preset 'nope'"),
        (("sweep", "afs", "--budgets", "0..1", "--preset", "zhang2019-trades"),
         "error: preset 'zhang2019-trades' is a trades recipe, not pgd-at"),
    ]:
        capsys.readouterr()
        assert run_cli(*argv, "--out", out) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), (argv, err)
        assert not out.exists()


def test_one_milestone_on_the_command_line_is_a_list():
    assert make_train_config("natural", {"lr_milestones": "3"}, [], None).lr_milestones == [3.0]
    assert make_train_config("natural", {"lr_milestones": "100,150"}, [], None).lr_milestones == [100.0, 150.0]
    assert make_train_config("natural", {"lr_milestones": "none"}, [], None).lr_milestones is None
