"""Typed options: ``TrainConfig`` for what every method shares, a dataclass per method for the rest.

These dataclasses are the single source of truth: the CLI generates its options from them,
config.json stores them, and Tune search spaces set their fields by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from raydefense.errors import UserError


@dataclass
class TrainConfig:
    """Everything ``fit`` needs; method-specific options go in ``options``."""

    method: str = "pgd-at"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False  # fetch a torchvision dataset into data_dir when it is missing (online only)
    arch: Optional[str] = None  # None: the dataset's default backbone
    eps: Optional[float] = None  # training budget in input scale; None: the dataset's standard eps
    attack_steps: int = 10  # PGD steps of the training attack
    attack_step_size: Optional[float] = None  # None: eps / 4
    eps_warmup_epochs: Optional[float] = None  # ramp the training eps up over this many epochs (None: per dataset)
    epochs: int = 20
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: Literal["piecewise", "cosine", "constant"] = "piecewise"
    lr_milestones: Optional[list[float]] = None  # piecewise: epochs at which lr *= lr_gamma (None: 50 % and 75 %)
    lr_gamma: float = 0.1  # piecewise decay factor
    augment: str = "auto"  # auto | none | comma list of crop, flip (raydefense/augment.py)
    augment_padding: Optional[int] = None  # crop padding in pixels (None: height // 8, i.e. 4 on 32x32)
    augment_pad_mode: Literal["zeros", "reflect"] = "zeros"  # zeros: torchvision RandomCrop; reflect: Rice et al.
    init_from: Optional[str] = None  # warm-start the weights from this checkpoint directory
    val_attack_steps: int = 10  # PGD steps used for validation robust accuracy
    patience: int = 0  # stop after this many epochs without a better val robust accuracy (0: never)
    seed: int = 0
    threads: int = 0  # CPU threads of this process (0: torch's default)
    attack_shards: int = 0  # CPU: split attack batches over N single-threaded workers (0: auto, 1: off)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fast paths (raydefense/fast.py; measured in docs/performance.md): off by default
    compile: bool = False  # torch.compile the modules (in place) for training
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast of the training step (fp16: CUDA only)
    channels_last: bool = False  # NHWC memory format for modules and training inputs
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_train_config(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return build_dataclass(cls, d, where="config")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Numeric fields and the range each must lie in: (lowest, highest, lowest allowed, highest allowed).
# Checked on every TrainConfig, so values from flags, a --config JSON, a search space or a stored
# config.json all meet the same rules before anything trains. Inputs are images in [0, 1]: an eps
# or step size above 1 is a unit mistake (8 instead of 8/255), not a budget.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "eps": (0.0, 1.0, True, True),
    "attack_step_size": (0.0, 1.0, False, True),
    "eps_warmup_epochs": (0.0, math.inf, True, False),
    "lr": (0.0, math.inf, False, False),
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "lr_gamma": (0.0, math.inf, False, False),
    "augment_padding": (0, math.inf, True, False),
    "epochs": (1, math.inf, True, False),
    "batch_size": (1, math.inf, True, False),
    "attack_steps": (0, math.inf, True, False),
    "val_attack_steps": (0, math.inf, True, False),
    "patience": (0, math.inf, True, False),
    "threads": (0, math.inf, True, False),
    "attack_shards": (0, math.inf, True, False),
}


def _range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    text = f"{'>=' if low_in else '>'} {low:g}"
    return text if high == math.inf else f"{text} and {'<=' if high_in else '<'} {high:g}"


def validate_train_config(cfg: "TrainConfig") -> None:
    """The one range check of TrainConfig's numbers (None: the per-dataset default, always valid)."""
    for name, (low, high, low_in, high_in) in _RANGES.items():
        value = getattr(cfg, name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # None: per dataset; a wrong type is _coerce's message, not this one
        ok = math.isfinite(value) and (value >= low if low_in else value > low) \
            and (value <= high if high_in else value < high)
        if not ok:
            hint = " (inputs are images in [0, 1]: write e.g. 8/255, not 8)" \
                if name in ("eps", "attack_step_size") and math.isfinite(value) and value > 1 else ""
            finite = "" if math.isfinite(value) else "a finite number "
            raise UserError(f"{name} must be {finite}{_range_text(low, high, low_in, high_in)}, got {value!r}{hint}")
    milestones = cfg.lr_milestones or []
    if any(isinstance(m, (int, float)) and not (math.isfinite(m) and m >= 0) for m in milestones):
        raise UserError(f"lr_milestones must be epochs >= 0, got {cfg.lr_milestones}")


# Fields that say where and how a run executes, never what it computes: resuming, sweep and search
# fingerprints and exported best configurations ignore them, and they are not searchable.
PLACEMENT_FIELDS = ("threads", "attack_shards", "device")

HELP: dict[str, str] = {
    "method": "defense to train",
    "dataset": "named dataset (digits works offline)",
    "data_dir": "where torchvision datasets live",
    "download": "download a torchvision dataset into --data-dir if missing (needs network)",
    "arch": "backbone: small-cnn, preact-resnet18, wrn-28-10, wrn-34-10 (default: per dataset)",
    "eps": "training L-inf budget in input scale, e.g. 8/255 (default: the dataset's standard eps)",
    "attack_steps": "PGD steps of the training attack",
    "attack_step_size": "PGD step size (default eps/4)",
    "eps_warmup_epochs": "ramp the training eps up linearly over this many epochs (stabilizes large eps)",
    "epochs": "training epochs",
    "batch_size": "training batch size",
    "optimizer": "sgd or adam",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "lr_schedule": "piecewise (x lr_gamma at each of --lr-milestones; default x0.1 at 50% and 75%), cosine or constant",
    "lr_milestones": "piecewise schedule: epochs at which the lr is multiplied by --lr-gamma, e.g. 100,150 "
                     "(default: 50% and 75% of the epochs)",
    "lr_gamma": "piecewise schedule: factor applied at each milestone",
    "augment": "training augmentation: auto (crop+flip on CIFAR/ImageNet-like, crop on SVHN, none on digits and "
               "MNIST-likes), none, or a comma list of crop, flip",
    "augment_padding": "random-crop padding in pixels (default: image height / 8, i.e. 4 on 32x32)",
    "augment_pad_mode": "random-crop padding: zeros (torchvision RandomCrop) or reflect (Rice et al. 2020)",
    "init_from": "warm-start the weights from this checkpoint directory (same arch and dataset)",
    "val_attack_steps": "PGD steps for validation robust accuracy",
    "patience": "early stop after this many epochs without improvement (0: never; best epoch kept anyway)",
    "seed": "random seed",
    "threads": "CPU threads of this process (0: torch default)",
    "attack_shards": "on CPU, split each attack's batch over N single-threaded workers (0: auto = threads for "
                     "models under 1M parameters, 1: off; docs/performance.md)",
    "device": "auto, cpu, cuda or cuda:N",
    "compile": "torch.compile the model for training (compilation is paid once per trial; docs/performance.md)",
    "amp": "mixed precision of the training step: off, bf16 (CPU with AMX/AVX512-BF16, recent GPUs; 8x slower on "
           "AVX2-only CPUs) or fp16 (CUDA); validation and evaluation stay fp32",
    "channels_last": "NHWC memory format for training (digits: 0.95-1.35x depending on the CPU; docs/performance.md)",
}


def _coerce(value: Any, tp: Any, name: str, where: str) -> Any:
    """Coerce a JSON or command-line value to the declared field type, or raise UserError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, where)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: {name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (dict, list, tuple):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                if origin in (list, tuple):
                    value = [v for v in value.split(",") if v]
            if origin in (list, tuple) and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]  # "--lr-milestones 100": a one-item list
        if origin is dict and isinstance(value, dict):
            return dict(value)
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            items = [_coerce(v, item, name, where) for v in value]
            return tuple(items) if origin is tuple else items
        raise UserError(f"{where}: {name} must be a {origin.__name__}, got {value!r}")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            from fractions import Fraction

            number = float(Fraction(value)) if isinstance(value, str) else float(value)
            if not math.isfinite(number):  # JSON's NaN / Infinity: never a meaningful option value
                raise UserError(f"{where}: {name} must be a finite number, got {value!r}")
            return number
        if tp is str:
            return str(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"{where}: {name} must be {tp.__name__}, got {value!r}") from None
    return value


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate ``cls`` from a dict, naming any unknown key or badly typed value."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of options, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where}: unknown option {unknown[0]!r}; known: {', '.join(sorted(known)) or 'none'}")
    return cls(**{k: _coerce(v, hints[k], k, where) for k, v in values.items()})


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Turn ``["beta=6", "lambda_schedule=linear-up"]`` into a dict of strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out
