"""Offline check of a Ray cluster-launcher YAML (``raydefense cluster check``).

Runs the same steps ``ray up`` runs before it talks to a cloud (``prepare_config``: provider
defaults, merged setup commands, per-type worker limits; then Ray's JSON schema and
``validate_config``), and stops there: no provider is instantiated, no cloud API is called. All
schema errors are reported at once, each with its path in the YAML (``available_node_types.gpu.min_workers``).
A few checks of our own follow, on what the schema cannot see (min > max workers, a GPU worker
type, raydefense installed by the setup commands).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydefense.errors import UserError
from raydefense.yaml_file import read_yaml

log = logging.getLogger(__name__)


@dataclass
class NodeType:
    name: str
    role: str  # head | worker
    min_workers: int
    max_workers: int
    resources: dict[str, Any]
    instance: str
    market: str  # on-demand | spot


@dataclass
class ClusterCheck:
    path: Path
    name: str
    provider: str
    region: str
    max_workers: int
    idle_timeout_minutes: float
    node_types: list[NodeType]
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the filled config, as ``ray up`` sees it


def load_yaml(path: str | Path) -> dict[str, Any]:
    data = read_yaml(path, "cluster config")
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping (cluster_name, provider, ...), not {type(data).__name__}")
    return data


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def schema_errors(config: dict[str, Any]) -> list[str]:
    """Every violation of Ray's ray-schema.json, as 'path: message', sorted by path."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


def _fail(path: Path, problems: list[str]) -> UserError:
    return UserError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))


def check_cluster_config(path: str | Path) -> ClusterCheck:
    """Validate ``path`` offline like ``ray up`` would; raise UserError naming every problem."""
    from ray.autoscaler._private.docker import validate_docker_config
    from ray.autoscaler._private.providers import _DEFAULT_CONFIGS
    from ray.autoscaler._private.util import (fill_node_type_min_max_workers, fillout_defaults,
                                              merge_setup_commands, validate_config)

    path = Path(path)
    raw = load_yaml(path)
    provider = raw.get("provider")
    if not isinstance(provider, dict) or "type" not in provider:
        raise _fail(path, ["provider: a mapping with a 'type' (aws, gcp, azure, ...) is required"])
    if provider["type"] not in _DEFAULT_CONFIGS:
        raise _fail(path, [f"provider.type: {provider['type']!r} is not one of {', '.join(sorted(_DEFAULT_CONFIGS))}"])
    if "available_node_types" in raw and "head_node_type" not in raw:
        raise _fail(path, ["head_node_type: required when available_node_types is set"])

    try:
        config = fillout_defaults(copy.deepcopy(raw))
    except Exception as exc:  # noqa: BLE001 - Ray's own message is the useful part
        raise _fail(path, [f"filling Ray's defaults failed: {exc}"]) from None
    problems = schema_errors(config)
    if problems:
        raise _fail(path, problems)
    quiet = logging.getLogger("ray.autoscaler._private.util")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # Ray logs every default it fills in at INFO
    try:
        merge_setup_commands(config)
        validate_docker_config(config)
        fill_node_type_min_max_workers(config)
        validate_config(config)
    except (ValueError, RuntimeError, AssertionError, KeyError, TypeError) as exc:
        message = str(exc) or type(exc).__name__
        where = next((k for k in ("head_node_type", "max_workers", "docker", "file_mounts") if k in message), None)
        raise _fail(path, [f"{where}: {message}" if where else message]) from None
    finally:
        quiet.setLevel(level)

    node_types, own = _node_types(config)
    problems += own
    if problems:
        raise _fail(path, problems)
    check = ClusterCheck(path, config["cluster_name"], config["provider"]["type"],
                         config["provider"].get("region", ""), int(config["max_workers"]),
                         float(config.get("idle_timeout_minutes", 0)), node_types, config=config)
    check.warnings = _warnings(config, node_types)
    return check


def _node_types(config: dict[str, Any]) -> tuple[list[NodeType], list[str]]:
    out, problems = [], []
    head = config["head_node_type"]
    for name, spec in config["available_node_types"].items():
        nc = spec.get("node_config", {})
        lo, hi = int(spec.get("min_workers", 0)), int(spec.get("max_workers", 0))
        where = f"available_node_types.{name}"
        if lo < 0:
            problems.append(f"{where}.min_workers: must be >= 0, got {lo}")
        if hi < lo and name != head:
            problems.append(f"{where}: min_workers {lo} > max_workers {hi}")
        spot = (nc.get("InstanceMarketOptions", {}) or {}).get("MarketType") == "spot" or any(
            isinstance(s, dict) and (s.get("preemptible") or s.get("provisioningModel") == "SPOT")
            for s in _as_list(nc.get("scheduling")))
        out.append(NodeType(name, "head" if name == head else "worker", lo, hi, dict(spec.get("resources", {})),
                            str(nc.get("InstanceType") or nc.get("machineType") or nc.get("vmSize") or "?"),
                            "spot" if spot else "on-demand"))
    if config["idle_timeout_minutes"] < 0:
        problems.append(f"idle_timeout_minutes: must be >= 0, got {config['idle_timeout_minutes']}")
    return out, problems


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _warnings(config: dict[str, Any], node_types: list[NodeType]) -> list[str]:
    warnings = []
    workers = [n for n in node_types if n.role == "worker"]
    if not any(n.resources.get("GPU", 0) > 0 or n.instance.startswith(("g", "p")) for n in workers):
        warnings.append("no worker type declares a GPU: --gpus-per-trial > 0 trials would never be scheduled")
    setup = " ".join(config.get("setup_commands", []) + config.get("worker_setup_commands", []))
    if "raydefense" not in setup:
        warnings.append("setup_commands do not install raydefense: trials would fail to import it on new nodes")
    if sum(n.max_workers for n in workers) < config["max_workers"]:
        warnings.append(f"max_workers {config['max_workers']} is more than the worker types together allow "
                        f"({sum(n.max_workers for n in workers)})")
    return warnings
