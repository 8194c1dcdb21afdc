"""Datasets: the digits default, and the torchvision / ImageFolder loaders on tiny fabricated files
in the real on-disk formats (no download happens in tests)."""

import pickle
import struct

import numpy as np
import pytest
import torch

from raydefense import load_dataset
from raydefense.data import format_eps, load_splits, parse_eps
from raydefense.errors import UserError


def test_digits_split_is_fixed_disjoint_and_in_range(digits):
    sizes = [len(digits[s]) for s in ("train", "val", "test")]
    assert sizes == [1257, 180, 360] and sum(sizes) == 1797
    x, y = load_dataset("digits", "test")
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (360, 1, 8, 8)
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    rows = {tuple(t.flatten().tolist()) for t in digits.train.images}
    overlap = sum(tuple(t.flatten().tolist()) in rows for t in digits.test.images)
    assert overlap < 10  # digits has a few exact duplicate images; the split itself is disjoint by index
    assert set(y.tolist()) == set(range(10))
    assert digits.info.eps_unit == digits.info.standard_eps / 8


def test_digits_read_without_sklearn_equal_sklearns_loader(monkeypatch):
    """The fast CSV read must give exactly what load_digits gives, and fall back to it if the file moves."""
    from sklearn.datasets import load_digits

    from raydefense import data

    reference = load_digits()
    images, labels = data._digits_arrays()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)

    class Moved:  # a scikit-learn whose data folder is elsewhere
        submodule_search_locations = ["/nonexistent"]

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: Moved())
    images, labels = data._digits_arrays()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)


def test_eps_parsing_and_printing():
    assert parse_eps("8/255") == 8 / 255 and parse_eps("0.3") == 0.3
    assert format_eps(8 / 255) == "8/255" and format_eps(3 / 16) == "3/16" and format_eps(0.3) == "0.3"
    for bad in ("-0.1", "abc", "1/0", "nan"):
        with pytest.raises(UserError):
            parse_eps(bad)


def test_unknown_dataset_and_missing_dir():
    with pytest.raises(UserError, match="unknown dataset 'imagenet1k'"):
        load_splits("imagenet1k")
    with pytest.raises(UserError, match="needs --data-dir"):
        load_splits("mnist")


def _write_idx(path, array: np.ndarray) -> None:
    dims = array.shape
    magic = 0x0800 | len(dims)  # unsigned byte data
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        fh.write(struct.pack(">" + "I" * len(dims), *dims))
        fh.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_from_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5100), ("t10k", 30)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    splits = load_splits(name, tmp_path)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [100, 5000, 30]
    x, y = splits.test.tensors()
    assert x.shape == (30, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert splits.info.standard_eps == (0.3 if name == "mnist" else 0.1)


@pytest.fixture
def trust_fabricated_files(monkeypatch):
    """Fabricated files cannot match the published md5 sums torchvision checks; only that check is skipped."""
    import torchvision.datasets as tvd

    import torchvision.datasets.cifar as tv_cifar

    for cls in (tvd.CIFAR10, tvd.CIFAR100, tvd.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the meta file's md5


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_python_pickles(tmp_path, name, trust_fabricated_files):
    rng = np.random.default_rng(0)
    key = "labels" if name == "cifar10" else "fine_labels"
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir()
    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    per_file = 5010 // len(files) + 1
    for f in files:
        batch = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8), key: rng.integers(0, 10, per_file).tolist()}
        pickle.dump(batch, open(folder / f, "wb"))
    pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), key: rng.integers(0, 10, 20).tolist()},
                open(folder / ("test_batch" if name == "cifar10" else "test"), "wb"))
    meta_key = "label_names" if name == "cifar10" else "fine_label_names"
    pickle.dump({meta_key: [f"c{i}" for i in range(10)]},
                open(folder / ("batches.meta" if name == "cifar10" else "meta"), "wb"))
    splits = load_splits(name, tmp_path)
    assert len(splits.val) == 5000 and len(splits.test) == 20
    x, _ = splits.test.tensors()
    assert x.shape == (20, 3, 32, 32)
    assert splits.info.standard_eps == 8 / 255 and splits.info.eps_unit == 1 / 255


def test_svhn_from_mat_files(tmp_path, trust_fabricated_files):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 5020), ("test", 12)):
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": rng.integers(1, 11, (n, 1))})
    splits = load_splits("svhn", tmp_path)
    assert len(splits.train) == 20 and len(splits.test) == 12
    _, y = splits.test.tensors()
    assert int(y.min()) >= 0 and int(y.max()) <= 9  # SVHN's label 10 means digit 0


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, n in (("train", 6), ("val", 2)):
        for cls in ("n01", "n02"):
            d = tmp_path / sub / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (70, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
    splits = load_splits("imagenette", tmp_path)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [11, 1, 4]
    x, _ = splits.train.tensors()
    assert x.shape == (11, 3, 64, 64)
    assert splits.info.num_classes == 10
