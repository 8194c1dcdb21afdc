"""Checkpoint directories: ``model.pt`` (tensors only, loaded with ``weights_only=True``) and
``config.json`` (everything needed to rebuild the model). No pickled objects, ever.

Files are written to a temporary name and renamed, so an interrupted write never leaves a file
that looks complete. ``load_model`` dispatches on ``config["kind"]`` so that trained methods,
AFS stacks and routed models all load through one call.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from raydefense.errors import CheckpointError, UserError

CONFIG = "config.json"
WEIGHTS = "model.pt"
TRAINER_STATE = "trainer_state.pt"

# kind -> "module:function(ckpt_dir, config, weights, device) -> nn.Module"
MODEL_LOADERS: dict[str, str] = {
    "method": "raydefense.checkpoint:load_method_model",
    "afs-stack": "raydefense.stack:load_stack_model",
    "route": "raydefense.route:load_route_model",
}


@contextmanager
def atomic_target(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_target(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


# What a tensor-only torch.save pickle imports; anything else in a refused file is pickled code.
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset")


def _pickled_globals(path: Path) -> list[str]:
    """The names the pickles in ``path`` import (GLOBAL / STACK_GLOBAL), read with pickletools,
    which never imports or runs anything. A zip checkpoint's data.pkl or a bare pickle file."""
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = b"".join(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(8):  # legacy torch.save files hold several pickles one after the other
        pushed: list = []
        memo: dict = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                    found.append(f"{pushed[-2]}.{pushed[-1]}")
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(arg))
                elif isinstance(arg, str):
                    pushed.append(arg)
                elif op.name != "FRAME":
                    pushed.append(None)
                if op.name == "STOP":
                    break
        except Exception:  # noqa: BLE001 - not (or no more) pickle data: report what was read
            break
    return found


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; a file holding pickled code is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        import re

        code = [g for g in _pickled_globals(path) if not g.startswith(_TENSOR_GLOBALS)]
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if code or found:  # a pickle that names code to import: never load it
            name = code[0] if code else found.group(1)
            raise CheckpointError(f"refusing to load {path}: it holds pickled objects, i.e. code to import and run "
                                  f"({name}), not only tensors") from None
        raise CheckpointError(f"cannot read {path}: not a tensor file saved by torch.save (corrupt or truncated?)") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    path = ckpt_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a checkpoint directory: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt {path}: {exc}") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise CheckpointError(f"corrupt {path}: no 'kind' field")
    return config


def save_checkpoint(ckpt_dir: str | Path, config: dict[str, Any], weights: dict[str, Any]) -> Path:
    """Write weights first, config last: a directory with a config.json is a usable checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    atomic_torch_save(ckpt_dir / WEIGHTS, weights)
    atomic_write_json(ckpt_dir / CONFIG, config)
    return ckpt_dir


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Public API: the inference module of any checkpoint, in eval mode (images in [0,1] -> logits)."""
    config = read_config(ckpt_dir)
    kind = config["kind"]
    if kind not in MODEL_LOADERS:
        raise CheckpointError(f"{ckpt_dir}: unknown checkpoint kind {kind!r}")
    weights = safe_torch_load(Path(ckpt_dir) / WEIGHTS, map_location=device)
    module_name, fn = MODEL_LOADERS[kind].split(":")
    model = getattr(importlib.import_module(module_name), fn)(Path(ckpt_dir), config, weights, torch.device(device))
    return model.eval()


def load_method(ckpt_dir: str | Path, device: str | torch.device = "cpu"):
    """The whole trained ``Method`` (all its modules, e.g. discriminators and detectors)."""
    config = read_config(ckpt_dir)
    if config["kind"] != "method":
        raise CheckpointError(f"{ckpt_dir} holds a {config['kind']!r}, not a trained method")
    weights = safe_torch_load(Path(ckpt_dir) / WEIGHTS, map_location=device)
    return method_from_weights(Path(ckpt_dir), config, weights, torch.device(device))


def method_from_weights(ckpt_dir: Path, config: dict, weights: dict, device: torch.device):
    """Rebuild a trained Method from its config.json and loaded weights (modules in eval mode)."""
    from raydefense.config import TrainConfig
    from raydefense.data import DatasetInfo
    from raydefense.methods import MethodContext, build_method

    try:
        cfg = TrainConfig.from_dict(config["train"])
        info = DatasetInfo.from_dict(config["dataset"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt {ckpt_dir / CONFIG}: missing or malformed field {exc}") from None
    except CheckpointError:
        raise
    except UserError as exc:  # e.g. lr NaN, saved before options were range-checked
        raise CheckpointError(f"{ckpt_dir / CONFIG} holds invalid training options: {exc}") from None
    method = build_method(MethodContext(cfg, info, device))
    c, h, w = info.shape
    described = (f"the {cfg.method} model its {CONFIG} describes ({method.ctx.arch} on {info.name}: "
                 f"{c}x{h}x{w} inputs, {info.num_classes} classes)")
    load_module_states(method.modules(), weights, ckpt_dir, described)
    for module in method.modules().values():
        module.eval()
    return method


def load_method_model(ckpt_dir: Path, config: dict, weights: dict, device: torch.device) -> nn.Module:
    return method_from_weights(ckpt_dir, config, weights, device).inference_module()


def module_states(modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


def _weights_shape(state: dict) -> str:
    """What a state dict was trained for, read from its shapes: input channels and classes."""
    parts = []
    mean = next((v for k, v in state.items() if k.endswith("normalize.mean") and hasattr(v, "numel")), None)
    if mean is not None:
        parts.append(f"{mean.numel()}-channel inputs")
    head = state.get("head.weight")
    if head is not None and getattr(head, "ndim", 0) == 2:
        parts.append(f"{head.shape[0]} classes")
    return ", ".join(parts)


def state_mismatch(module: nn.Module, state: dict, limit: int = 3) -> str:
    """One line naming what differs between a module and a state dict: shapes, missing, unexpected keys."""
    own = module.state_dict()
    shapes = [f"{k} is {list(v.shape)} in {WEIGHTS} but {list(own[k].shape)} in the model"
              for k, v in state.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]

    def listed(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

    parts = [f"shapes differ: {listed(shapes)}"] if shapes else []
    parts += [f"missing from {WEIGHTS}: {listed(missing)}"] if missing else []
    parts += [f"not in the model: {listed(unexpected)}"] if unexpected else []
    return "; ".join(parts)


def load_module_states(modules: dict[str, nn.Module], weights: dict, where: Path | str, described: str = "") -> None:
    """Load each module's state; a misfit names the shapes, what the weights were trained for and,
    given ``described``, the model the config asks for."""
    missing = sorted(set(modules) - set(weights))
    if missing:
        raise CheckpointError(f"{where}: weights for {', '.join(missing)} are missing from {WEIGHTS}")
    for name, module in modules.items():
        try:
            module.load_state_dict(weights[name])
        except RuntimeError as exc:
            detail = state_mismatch(module, weights[name]) or str(exc).splitlines()[0]
            trained = _weights_shape(weights[name])
            raise CheckpointError(f"{where}: the {name} weights in {WEIGHTS}"
                                  + (f" (for {trained})" if trained else "")
                                  + f" do not fit {described or 'the model'}: {detail}") from None
