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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from raydefense.errors import CheckpointError

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


def safe_torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; a file holding pickled code is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        import re

        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # a real pickle that names code to import: never load it
            raise CheckpointError(f"refusing to load {path}: it holds pickled objects, not only tensors "
                                  f"(it imports {found.group(1)})") from None
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
    method = build_method(MethodContext(cfg, info, device))
    load_module_states(method.modules(), weights, ckpt_dir)
    for module in method.modules().values():
        module.eval()
    return method


def load_method_model(ckpt_dir: Path, config: dict, weights: dict, device: torch.device) -> nn.Module:
    return method_from_weights(ckpt_dir, config, weights, device).inference_module()


def module_states(modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


def load_module_states(modules: dict[str, nn.Module], weights: dict, where: Path | str) -> None:
    missing = sorted(set(modules) - set(weights))
    if missing:
        raise CheckpointError(f"{where}: weights for {', '.join(missing)} are missing from {WEIGHTS}")
    for name, module in modules.items():
        try:
            module.load_state_dict(weights[name])
        except RuntimeError as exc:
            raise CheckpointError(f"{where}: {name} weights do not fit the model: {str(exc).splitlines()[0]}") from None
