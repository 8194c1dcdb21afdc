"""The function trainable every Tune experiment of raydefense runs: ``fit`` inside a trial.

The dataset arrives through ``tune.with_parameters`` (put once in Ray's object store and shared by
all trials). Each epoch is reported with the trial's checkpoint directory, so a restored trial
continues from its last epoch; after training an optional ``post`` hook (e.g. AFS's Delta_z) adds
final metrics in one last report with ``done_training=True``.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def trial_device(gpus_per_trial: float) -> str:
    """CUDA only when the trial was given a GPU share and one is physically visible."""
    return "cuda" if gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"


def run_post_hook(spec: str | None, ckpt_dir: Path, splits, options: dict) -> dict[str, float]:
    if not spec:
        return {}
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)(ckpt_dir, splits, **options)


def with_tradeoff(metrics: dict[str, float]) -> dict[str, float]:
    """Add ``val_tradeoff`` = mean(val clean, val robust accuracy): the scalar ``tune`` optimizes."""
    if "val_clean_acc" in metrics and "val_robust_acc" in metrics:
        return {**metrics, "val_tradeoff": 0.5 * (metrics["val_clean_acc"] + metrics["val_robust_acc"])}
    return metrics


def merged_train_config(config: dict[str, Any]) -> dict[str, Any]:
    """Apply a trial's sampled values to the base TrainConfig dict.

    Keys ``train.<field>`` set a TrainConfig field and ``options.<name>`` a method option, at the
    top level (what searchers sample) or inside a ``point`` dict (a grid over coupled values, e.g.
    an AFS budget and its eps).
    """
    train = dict(config["train"])
    train["options"] = dict(train.get("options", {}))
    flat = {**config, **config.get("point", {})}
    for key, value in flat.items():
        if key.startswith("train."):
            train[key[len("train."):]] = value
        elif key.startswith("options."):
            train["options"][key[len("options."):]] = value
    return train


def train_trial(config: dict[str, Any], splits=None) -> None:
    """Tune function trainable. ``config``: {"train": TrainConfig dict, "post": "mod:fn" | None,
    "post_options": {...}, "gpus_per_trial": float, "cpus_per_trial": float, and sampled values
    (see ``merged_train_config``)}."""
    from ray import tune

    from raydefense.config import TrainConfig
    from raydefense.train import fit

    threads = max(1, int(config.get("cpus_per_trial", 1)))
    torch.set_num_threads(threads)
    if int(config.get("workers_per_trial", 1)) > 1:
        return _train_trial_workers(config, {**merged_train_config(config), "threads": threads}, splits)
    cfg = TrainConfig.from_dict({**merged_train_config(config), "threads": threads,
                                 "device": trial_device(config.get("gpus_per_trial", 0))})
    work = Path(tempfile.mkdtemp(prefix="raydefense-trial-"))
    try:
        restored = tune.get_checkpoint()
        if restored is not None:
            restored.to_directory(str(work))
            log.info("trial %s resumes from its checkpoint", tune.get_context().get_trial_name())
        if (work / "post.json").is_file():  # training and post hook both finished before a restart
            import json

            tune.report(json.loads((work / "post.json").read_text()),
                        checkpoint=tune.Checkpoint.from_directory(str(work)))
            return
        resources = tune.get_context().get_trial_resources()
        placement = {"gpu_ids": ",".join(map(str, _gpu_ids())), "trial_gpus": _bundle(resources, "GPU"),
                     "trial_cpus": _bundle(resources, "CPU"), "node_id": _node_id()}

        def report(metrics: dict[str, float], ckpt_dir: Path) -> None:
            tune.report({**with_tradeoff(metrics), **placement, "done_training": False},
                        checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

        result = fit(cfg, work, splits=splits, reporter=report)
        final = {**with_tradeoff(result.best), **placement, "epochs_run": len(result.history), "done_training": True,
                 "best_epoch": result.best.get("epoch", 0), "resumed_from_epoch": result.start_epoch}
        final.update(run_post_hook(config.get("post"), work, splits, config.get("post_options", {})))
        import json

        (work / "post.json").write_text(json.dumps(final))
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_trial_workers(config: dict[str, Any], train: dict[str, Any], splits) -> None:
    """The trial as a Ray Train TorchTrainer of ``workers_per_trial`` data-parallel workers; one
    final report to Tune with rank 0's checkpoint (per-epoch metrics stay in Train's own run)."""
    import json

    from ray import tune

    from raydefense.distributed.train_workers import run_trainer

    workers = int(config["workers_per_trial"])
    out = run_trainer(config, train, splits, workers, float(config.get("cpus_per_trial", 1)),
                      float(config.get("gpus_per_trial", 0)), int(config.get("train_max_failures", 0)))
    try:
        final = {**json.loads((out / "post.json").read_text()), "node_id": _node_id(), "workers": workers}
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(out)))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _gpu_ids() -> list:
    import ray

    try:
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a worker there are none
        return []


def _node_id() -> str:
    """The Ray node this attempt runs on: shows where trials landed and where a retry went."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return ""


def _bundle(resources, key: str) -> float:
    try:
        return float(resources.required_resources.get(key, 0.0))
    except AttributeError:
        return 0.0
