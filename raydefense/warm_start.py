"""``--init-from CKPT``: start a run from a trained checkpoint's weights instead of a random init.

Only the weights travel (optimizer, schedule and epoch count start fresh), loaded with
``weights_only=True`` like every checkpoint. Modules are matched by name, so a PGD-AT, TRADES or
natural model (all one ``model``) can warm-start any of the three; a checkpoint of another
architecture or dataset is refused in one line before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from raydefense.checkpoint import WEIGHTS, load_module_states, read_config, safe_torch_load
from raydefense.errors import CheckpointError

log = logging.getLogger(__name__)


def warm_start(method, ckpt_dir: str | Path, dataset: str) -> list[str]:
    """Load the weights of ``ckpt_dir`` into the modules of ``method`` that it holds; return their names."""
    where = f"--init-from {ckpt_dir}"
    config = read_config(ckpt_dir)
    if config["kind"] != "method":
        raise CheckpointError(f"{where}: holds a {config['kind']!r}, not a trained method")
    arch, stored_dataset = config.get("arch"), (config.get("dataset") or {}).get("name")
    if arch != method.ctx.arch or stored_dataset != dataset:
        raise CheckpointError(f"{where}: holds a {arch} on {stored_dataset}, this run trains a "
                              f"{method.ctx.arch} on {dataset}")
    weights = safe_torch_load(Path(ckpt_dir) / WEIGHTS, map_location=method.ctx.device)
    modules = {k: m for k, m in method.modules().items() if k in weights}
    if not modules:
        raise CheckpointError(f"{where}: none of this method's modules ({', '.join(method.modules())}) "
                              f"are in its {WEIGHTS} ({', '.join(weights)})")
    load_module_states(modules, weights, where)
    log.info("warm start from %s: %s", ckpt_dir, ", ".join(modules))
    return list(modules)


def absolute_init_from(cfg):
    """``cfg`` with ``init_from`` as an absolute path, so that trials in other working directories find it."""
    if not cfg.init_from:
        return cfg
    return cfg.replace(init_from=str(Path(cfg.init_from).expanduser().resolve()))
