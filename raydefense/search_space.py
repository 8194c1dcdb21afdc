"""Search spaces: ``search_spaces/<method>.yaml`` -> typed dimensions -> an Optuna define-by-run function.

A file looks like::

    method: ldat                       # optional; must match the method being tuned
    fixed:                             # set in every trial (not searched)
      options.margin: 0.1
    dimensions:
      options.beta:            {type: float, low: 0.3, high: 0.7}
      train.lr:                {type: log-float, low: 0.01, high: 0.3}
      options.lambda_schedule: {type: categorical, choices: [constant, linear-up, linear-down]}
      train.eps_warmup_epochs: {type: int, low: 1, high: 4,
                                when: {options.lambda_schedule: [linear-up, linear-down]}}

Keys are ``train.<TrainConfig field>`` or ``options.<method option>`` (what
``distributed.trial.merged_train_config`` applies). Types: ``float`` (optional ``step``),
``log-float``, ``int`` (optional ``step``, ``log``) and ``categorical``. ``when`` makes a dimension
conditional on earlier categorical dimensions, so the space is define-by-run (Optuna samples it
only when active; otherwise the option keeps its default). Everything is checked before any trial
starts, and a malformed file fails with its path, the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydefense.config import PLACEMENT_FIELDS, TrainConfig, _coerce
from raydefense.errors import UserError
from raydefense.yaml_file import read_yaml

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
TYPES = ("float", "log-float", "int", "categorical")
_DIM_KEYS = {"type", "low", "high", "step", "log", "choices", "when"}
# TrainConfig fields a search must not touch: they say where/how a trial runs, not what it trains
_NOT_SEARCHABLE = ("method", "dataset", "data_dir", *PLACEMENT_FIELDS, "options")


@dataclass(frozen=True)
class Dim:
    """One searched value."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)  # key -> allowed values of an earlier dimension

    def active(self, values: dict[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in self.when.items())

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step,
                                   log=self.type == "log-float")

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        try:
            return self.low <= value <= self.high and (self.type != "int" or float(value).is_integer())
        except TypeError:
            return False

    def distribution(self):
        import optuna

        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), step=int(self.step or 1),
                                                        log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), step=self.step,
                                                      log=self.type == "log-float")


@dataclass
class SearchSpace:
    path: str
    method: str | None
    dims: list[Dim]
    fixed: dict[str, Any] = field(default_factory=dict)

    def sample(self, trial) -> dict[str, Any]:
        """Optuna define-by-run function: active dimensions in file order, then the fixed values."""
        values: dict[str, Any] = {}
        for dim in self.dims:
            if dim.active(values):
                values[dim.key] = dim.suggest(trial)
        return {**values, **self.fixed}

    def distributions(self, params: dict[str, Any]) -> dict[str, Any]:
        """The Optuna distributions of the dimensions present in ``params`` (a trial's sampled values)."""
        return {d.key: d.distribution() for d in self.dims if d.key in params}

    def searched(self, config: dict[str, Any]) -> dict[str, Any]:
        return {d.key: config[d.key] for d in self.dims if d.key in config}

    def default_point(self, method: str, base: TrainConfig | None = None) -> dict[str, Any]:
        """The default configuration expressed in this space (for Optuna's first trial): the base
        TrainConfig of the command (its defaults plus what the user set) and the method's options."""
        from raydefense.methods import get_method_class

        base = base or TrainConfig(method=method)
        defaults = {f"train.{f.name}": getattr(base, f.name) for f in dataclasses.fields(TrainConfig)}
        opts = get_method_class(method).Options
        defaults.update({f"options.{f.name}": f.default for f in dataclasses.fields(opts)
                         if f.default is not dataclasses.MISSING})
        defaults.update({f"options.{k}": v for k, v in base.options.items()})
        point: dict[str, Any] = {}
        for dim in self.dims:  # a default outside the searched range is left to the sampler
            if dim.active(point) and defaults.get(dim.key) is not None and dim.contains(defaults[dim.key]):
                point[dim.key] = defaults[dim.key]
        return point


def space_path(method: str, path: str | Path | None = None) -> Path:
    if path is not None:
        return Path(path)
    return SPACES_DIR / f"{method}.yaml"


def load_search_space(path: str | Path, method: str | None = None, check_options: bool = True) -> SearchSpace:
    """Parse and validate a YAML search space. ``method`` (when given and registered) checks the
    ``options.*`` keys against its Options dataclass; unregistered methods skip that check."""
    data = read_yaml(path, "search space")
    return parse_search_space(data, str(path), method, check_options)


def parse_search_space(data: Any, where: str, method: str | None = None, check_options: bool = True) -> SearchSpace:
    def fail(key: str, what: str) -> UserError:
        return UserError(f"{where}: {key}: {what}")

    if not isinstance(data, dict):
        raise fail("<top>", "expected a mapping with 'dimensions' (and optionally 'method', 'fixed')")
    unknown = sorted(set(data) - {"method", "fixed", "dimensions", "description"})
    if unknown:
        raise fail(unknown[0], "unknown top-level key; allowed: method, description, fixed, dimensions")
    file_method = data.get("method")
    if file_method is not None and method is not None and file_method != method:
        raise fail("method", f"this space is for {file_method!r}, not {method!r}")
    method = method or file_method
    option_types = _option_types(method) if check_options else None
    dims_raw = data.get("dimensions")
    if not isinstance(dims_raw, dict) or not dims_raw:
        raise fail("dimensions", "expected a non-empty mapping of key -> {type: ...}")
    fixed_raw = data.get("fixed") or {}
    if not isinstance(fixed_raw, dict):
        raise fail("fixed", "expected a mapping of key -> value")

    dims: list[Dim] = []
    for key, spec in dims_raw.items():
        tp = _field_type(str(key), option_types, fail)
        dims.append(_parse_dim(str(key), spec, tp, {d.key: d for d in dims}, fail))
    fixed = {}
    for key, value in fixed_raw.items():
        tp = _field_type(str(key), option_types, fail)
        if key in dims_raw:
            raise fail(key, "is both fixed and searched")
        fixed[str(key)] = _typed(value, tp, key, fail)
    return SearchSpace(where, file_method, dims, fixed)


def _option_types(method: str | None) -> dict[str, Any] | None:
    """The method's option types, or None when the method is not registered (yet)."""
    from raydefense.methods import REGISTRY, get_method_class

    if method is None or method not in REGISTRY:
        return None
    return typing.get_type_hints(get_method_class(method).Options)


def _field_type(key: str, option_types: dict | None, fail) -> Any:
    prefix, _, name = key.partition(".")
    if prefix == "train" and name:
        hints = typing.get_type_hints(TrainConfig)
        if name not in hints:
            raise fail(key, f"TrainConfig has no field {name!r}")
        if name in _NOT_SEARCHABLE:
            raise fail(key, "cannot be searched or fixed here (set it on the command line)")
        return hints[name]
    if prefix == "options" and name:
        if option_types is None:
            return Any  # method not registered in this tree: its options are checked once it is
        if name not in option_types:
            known = ", ".join(sorted(option_types)) or "none"
            raise fail(key, f"the method has no option {name!r} (known: {known})")
        return option_types[name]
    raise fail(key, "keys are train.<TrainConfig field> or options.<method option>")


def _typed(value: Any, tp: Any, key: str, fail) -> Any:
    try:
        return _coerce(value, tp, key, "value")
    except UserError as exc:
        raise fail(key, str(exc).split(": ", 2)[-1]) from None


def _parse_dim(key: str, spec: Any, tp: Any, earlier: dict[str, Dim], fail) -> Dim:
    if not isinstance(spec, dict):
        raise fail(key, "expected a mapping such as {type: float, low: 0.1, high: 1}")
    unknown = sorted(set(spec) - _DIM_KEYS)
    if unknown:
        raise fail(key, f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_DIM_KEYS))}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise fail(key, f"type must be one of {', '.join(TYPES)}, got {kind!r}")
    when = _parse_when(key, spec.get("when"), earlier, fail)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(key, "categorical needs a non-empty list 'choices'")
        extra = sorted(set(spec) & {"low", "high", "step", "log"})
        if extra:
            raise fail(key, f"categorical takes 'choices', not {extra[0]!r}")
        typed = tuple(_typed(c, tp, key, fail) for c in choices)
        if len(set(typed)) != len(typed):
            raise fail(key, "choices repeat a value")
        return Dim(key, kind, choices=typed, when=when)
    if "choices" in spec:
        raise fail(key, f"{kind} takes low/high, not 'choices'")
    for bound in ("low", "high"):
        if bound not in spec:
            raise fail(key, f"{kind} needs '{bound}'")
        if isinstance(spec[bound], bool) or not isinstance(spec[bound], (int, float)):
            raise fail(key, f"{bound} must be a number, got {spec[bound]!r}")
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if not low < high:
        raise fail(key, f"low ({low}) must be below high ({high})")
    if kind == "int":
        if not all(float(v).is_integer() for v in (low, high) + ((step,) if step is not None else ())):
            raise fail(key, "int bounds and step must be whole numbers")
        if _base(tp) is float:
            pass  # an int range for a float option is fine
        elif _base(tp) not in (int, Any):
            raise fail(key, f"the option is {getattr(_base(tp), '__name__', tp)}, not a number")
    elif _base(tp) is int:
        raise fail(key, f"the option is an integer: use type int, not {kind}")
    elif _base(tp) not in (float, Any):
        raise fail(key, f"the option is {getattr(_base(tp), '__name__', tp)}, not a number: use categorical")
    if kind == "log-float" and low <= 0:
        raise fail(key, f"log-float needs low > 0, got {low}")
    log = bool(spec.get("log", False))
    if kind != "int" and "log" in spec:
        raise fail(key, "'log' is for int; use type log-float for a float")
    if step is not None:
        if kind == "log-float" or log:
            raise fail(key, "a log scale takes no step")
        if not isinstance(step, (int, float)) or step <= 0:
            raise fail(key, f"step must be > 0, got {step!r}")
    return Dim(key, kind, low, high, step, log, when=when)


def _parse_when(key: str, when: Any, earlier: dict[str, Dim], fail) -> dict[str, tuple]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise fail(key, "'when' must map an earlier categorical dimension to its value(s)")
    out = {}
    for parent, allowed in when.items():
        if parent not in earlier:
            raise fail(key, f"'when' refers to {parent!r}, which is not a dimension defined above it")
        if earlier[parent].type != "categorical":
            raise fail(key, f"'when' refers to {parent!r}, which is not categorical")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        bad = [a for a in allowed if a not in earlier[parent].choices]
        if bad:
            raise fail(key, f"'when' value {bad[0]!r} is not a choice of {parent}")
        out[str(parent)] = allowed
    return out


def _base(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp
