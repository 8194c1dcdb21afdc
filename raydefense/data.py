"""Named datasets with a fixed train/val/test split that every command shares.

Images are kept as uint8 (``max_value`` says what 1.0 is) so that large datasets stay small in
memory and in Ray's object store; ``Split.tensors()`` gives float images in [0, 1].
The validation split is carved from the official training set with a fixed seed, so that every
trial, tune search and evaluation of a dataset sees the same split; the test split is only for
``evaluate``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raydefense.errors import UserError

log = logging.getLogger(__name__)

SPLIT_SEED = 20240601  # fixed: the split is part of a dataset's identity, not of a run
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What models and attacks need to know about a dataset."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    standard_eps: float  # the L-inf budget papers report for this dataset, in input scale
    standard_eps_label: str  # how humans write it ("8/255", "0.3")
    default_eps_warmup: float = 0.0  # epochs of training-eps ramp when the user does not choose

    @property
    def eps_unit(self) -> float:
        """One AFS budget step: standard_eps / 8 (CIFAR: exactly 1/255)."""
        return self.standard_eps / 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(**{**d, "shape": tuple(d["shape"]), "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass
class Split:
    """One split: uint8 images (N, C, H, W) whose value ``max_value`` means 1.0, int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    max_value: int = 255

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and long labels."""
        return self.images.float().div_(self.max_value), self.labels.long()


@dataclass
class Splits:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split

    def __getitem__(self, name: str) -> Split:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def format_eps(eps: float) -> str:
    """Print eps as the fraction humans use (8/255, 0.3, 3/16)."""
    if eps == 0:
        return "0"
    for denom in (255, 16, 10, 100, 8, 32, 64, 128):
        num = eps * denom
        if abs(num - round(num)) < 1e-6:
            return f"{round(num)}/{denom}" if denom not in (10, 100) else f"{eps:g}"
    return f"{eps:.4g}"


def parse_eps(text: str | float) -> float:
    """Parse '8/255', '0.3' or a float into input scale; negative values are refused."""
    try:
        value = float(Fraction(str(text).strip())) if not isinstance(text, float) else text
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read eps {text!r}: write a number like 0.3 or a fraction like 8/255")
    if value < 0 or not np.isfinite(value):
        raise UserError(f"eps must be a finite number >= 0, got {text!r}")
    return value


def _split_train_val(images: np.ndarray, labels: np.ndarray, n_val: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(labels))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def _make_splits(info: DatasetInfo, train_x, train_y, test_x, test_y, n_val: int, max_value: int = 255) -> Splits:
    tx, ty, vx, vy = _split_train_val(np.asarray(train_x), np.asarray(train_y), n_val)

    def split(x, y) -> Split:
        return Split(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.uint8),
                     torch.as_tensor(np.asarray(y), dtype=torch.int64), max_value)

    return Splits(info, split(tx, ty), split(vx, vy), split(test_x, test_y))


# --------------------------------------------------------------------------------------------
# Loaders. Each returns Splits; torchvision loaders download only when asked.

def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images N,8,8 in 0..16, labels N).

    Reads the CSV that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the
    label per row) without importing scikit-learn, whose import costs about 2.5 s of every command
    on digits; falls back to ``load_digits`` if a scikit-learn release moves the file."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _load_digits(data_dir: Path | None, download: bool) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16): the offline default."""
    pixels, target = _digits_arrays()
    images = pixels.astype(np.uint8)[:, None]  # N,1,8,8 with values 0..16
    labels = target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(labels))
    n_test = 360
    test_idx, rest = order[:n_test], order[n_test:]
    x = images / 16.0
    info = DatasetInfo("digits", 10, (1, 8, 8), (float(x.mean()),), (float(x.std()),),
                       DIGITS_EPS, format_eps(DIGITS_EPS), default_eps_warmup=5.0)
    return _make_splits(info, images[rest], labels[rest], images[test_idx], labels[test_idx],
                        n_val=180, max_value=16)


# Measured (README, "Choosing eps for digits"; 20 epochs, test split): at 3/16 PGD-AT loses no clean
# accuracy (98.3 %), at 4/16 it visibly trades it (96.7 % clean, PGD-20 51.7 %, natural ~0 %), and
# beyond 4/16 training collapses without an eps warm-up (7.5 % clean at 5/16). Digits values are
# multiples of 1/16, so 4/16 is the largest budget that keeps every digit recognisable.
DIGITS_EPS = 1 / 4


def _tv_root(data_dir: Path | None, name: str) -> Path:
    if data_dir is None:
        raise UserError(f"dataset {name!r} needs --data-dir (add --download to fetch it when online)")
    return Path(data_dir).expanduser()


def _tv_call(name: str, factory: Callable, **kwargs):
    try:
        return factory(**kwargs)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        hint = "" if kwargs.get("download") else " (pass --download to fetch it)"
        raise UserError(f"{name}: no usable files under {kwargs.get('root')}{hint}: {exc}") from None


def _load_mnist_like(cls_name: str, name: str, eps: float, label: str, mean: float, std: float):
    def load(data_dir: Path | None, download: bool) -> Splits:
        import torchvision.datasets as tvd

        root = _tv_root(data_dir, name)
        cls = getattr(tvd, cls_name)
        train = _tv_call(name, cls, root=str(root), train=True, download=download)
        test = _tv_call(name, cls, root=str(root), train=False, download=download)
        info = DatasetInfo(name, 10, (1, 28, 28), (mean,), (std,), eps, label)
        return _make_splits(info, train.data.numpy()[:, None], train.targets.numpy(),
                            test.data.numpy()[:, None], test.targets.numpy(), n_val=5000)

    return load


def _load_cifar(cls_name: str, name: str, classes: int, mean, std):
    def load(data_dir: Path | None, download: bool) -> Splits:
        import torchvision.datasets as tvd

        root = _tv_root(data_dir, name)
        cls = getattr(tvd, cls_name)
        train = _tv_call(name, cls, root=str(root), train=True, download=download)
        test = _tv_call(name, cls, root=str(root), train=False, download=download)
        info = DatasetInfo(name, classes, (3, 32, 32), mean, std, 8 / 255, "8/255")
        return _make_splits(info, train.data.transpose(0, 3, 1, 2), train.targets,
                            test.data.transpose(0, 3, 1, 2), test.targets, n_val=5000)

    return load


def _load_svhn(data_dir: Path | None, download: bool) -> Splits:
    import torchvision.datasets as tvd

    root = _tv_root(data_dir, "svhn")
    train = _tv_call("svhn", tvd.SVHN, root=str(root), split="train", download=download)
    test = _tv_call("svhn", tvd.SVHN, root=str(root), split="test", download=download)
    info = DatasetInfo("svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), 8 / 255, "8/255")
    return _make_splits(info, train.data, train.labels, test.data, test.labels, n_val=5000)


def _load_image_folder(name: str, size: int, classes: int | None, val_dir: str):
    """Tiny-ImageNet / Imagenette laid out as <data-dir>/train/<class>/*.jpg and <data-dir>/<val_dir>/."""

    def load(data_dir: Path | None, download: bool) -> Splits:
        import torchvision.datasets as tvd
        import torchvision.transforms as T

        root = _tv_root(data_dir, name)
        if download:
            raise UserError(f"{name}: automatic download is not supported; unpack it under --data-dir")
        tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])

        def read(sub: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
            path = root / sub
            if not path.is_dir():
                raise UserError(f"{name}: expected class folders under {path}")
            ds = tvd.ImageFolder(str(path), transform=tf)
            xs = np.stack([ds[i][0].numpy() for i in range(len(ds))]) if len(ds) else np.zeros((0, 3, size, size), np.uint8)
            return xs, np.asarray(ds.targets, dtype=np.int64), ds.classes

        train_x, train_y, train_classes = read("train")
        test_x, test_y, test_classes = read(val_dir)
        if test_classes != train_classes:
            raise UserError(f"{name}: class folders differ between train/ and {val_dir}/")
        n_classes = classes or len(train_classes)
        xf = train_x.astype(np.float32) / 255
        info = DatasetInfo(name, n_classes, (3, size, size), tuple(float(m) for m in xf.mean((0, 2, 3))),
                           tuple(float(s) for s in xf.std((0, 2, 3))), 8 / 255, "8/255")
        n_val = max(1, min(5000, len(train_y) // 10))
        return _make_splits(info, train_x, train_y, test_x, test_y, n_val=n_val)

    return load


LOADERS: dict[str, Callable[[Path | None, bool], Splits]] = {
    "digits": _load_digits,
    "mnist": _load_mnist_like("MNIST", "mnist", 0.3, "0.3", 0.1307, 0.3081),
    "fashion-mnist": _load_mnist_like("FashionMNIST", "fashion-mnist", 0.1, "0.1", 0.2860, 0.3530),
    "cifar10": _load_cifar("CIFAR10", "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": _load_cifar("CIFAR100", "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": _load_svhn,
    "tiny-imagenet": _load_image_folder("tiny-imagenet", 64, 200, "val"),
    "imagenette": _load_image_folder("imagenette", 64, 10, "val"),
}
DATASETS = tuple(LOADERS)

_CACHE: dict[tuple, Splits] = {}


def load_splits(name: str = "digits", data_dir: str | Path | None = None, download: bool = False) -> Splits:
    """All three splits of a named dataset (cached per process)."""
    key = (name, str(data_dir) if data_dir else None)
    if key in _CACHE:
        return _CACHE[key]
    if name not in LOADERS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    splits = LOADERS[name](Path(data_dir) if data_dir else None, download)
    log.info("loaded %s: train %d, val %d, test %d", name, len(splits.train), len(splits.val), len(splits.test))
    _CACHE[key] = splits
    return splits


def dataset_info(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    return load_splits(name, data_dir).info


def load_dataset(name: str = "digits", split: str = "test", data_dir: str | Path | None = None,
                 download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Public API: ``(images float in [0,1] NCHW, labels long)`` for one split of a named dataset."""
    return load_splits(name, data_dir, download)[split].tensors()
