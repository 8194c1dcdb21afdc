"""Data-parallel training of one trial over N Ray Train workers (``--workers-per-trial N``).

``fit`` trains a ``Method`` on one device. ``DataParallel`` makes N copies of that loop behave as
one: every worker draws the same global batch order (same seed), keeps its own slice of each
batch, and before every optimizer step the gradients are averaged over the workers
(``torch.distributed.all_reduce``, gloo on CPU, NCCL on GPU). Because every worker starts from
the same seed-determined weights and applies the same averaged gradient, the copies stay
identical, and the run follows the single-worker loss curve with the same global batch (exactly
up to float rounding and the attack's random starts, when the slices are equal in size). It works
for any Method, however many optimizers it steps, without wrapping its modules (so checkpoints
keep their single-worker layout).

``run_trainer`` is what a Tune trial runs when ``workers_per_trial > 1``: a Ray Train
``TorchTrainer`` inside the trial (Ray's Train-in-Tune pattern), whose workers run
``worker_loop``; rank 0's checkpoint is the trial's.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class DataParallel:
    """Batch sharding + gradient and metric averaging over a torch.distributed process group."""

    def __init__(self, rank: int | None = None, world_size: int | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self._hooks: list = []

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This worker's part of a global batch (strided, so slices differ by at most one sample)."""
        return idx[self.rank::self.world_size]

    def _average_grads(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:  # a parameter this step does not train (e.g. another player's)
                    continue
                self.dist.all_reduce(p.grad, op=self.dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    def attach(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """Average gradients right before each optimizer step."""
        for opt in optimizers.values():
            self._hooks.append(opt.register_step_pre_hook(self._average_grads))

    def average(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each step metric over the workers (so logs show the global batch's loss)."""
        if not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: ``fit`` with DataParallel; rank 0 reports checkpoints."""
    import ray
    import ray.train

    from raydefense.config import TrainConfig
    from raydefense.distributed.trial import run_post_hook
    from raydefense.train import fit

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(loop_config["threads"])))
    splits = ray.get(loop_config["splits_ref"])
    use_gpu = loop_config.get("use_gpu", False) and torch.cuda.is_available()
    cfg = TrainConfig.from_dict({**loop_config["train"], "device": "cuda" if use_gpu else "cpu"})
    work = Path(tempfile.mkdtemp(prefix=f"raydefense-rank{rank}-"))
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            restored.to_directory(str(work))
        dp = DataParallel()

        def report(metrics: dict[str, float], ckpt_dir: Path) -> None:
            ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if rank == 0 else None
            ray.train.report({**metrics, "done_training": False}, checkpoint=ckpt)

        result = fit(cfg, work, splits=splits, reporter=report, data_parallel=dp)
        if rank == 0:
            final = {**result.best, "epochs_run": len(result.history), "best_epoch": result.best.get("epoch", 0),
                     "resumed_from_epoch": result.start_epoch, "workers": dp.world_size}
            final.update(run_post_hook(loop_config.get("post"), work, splits, loop_config.get("post_options", {})))
            (work / "post.json").write_text(json.dumps({**final, "done_training": True}))
        ray.train.report({"done_training": True}, checkpoint=ray.train.Checkpoint.from_directory(str(work))
                         if rank == 0 else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _trial_storage(tctx) -> str:
    """The trial's directory in the experiment's storage (local path or s3://...), where a retried
    trial on another node finds Train's checkpoints; the node-local trial dir as a fallback."""
    try:
        from ray.train._internal.session import get_storage  # developer API

        st = get_storage()
        return f"{str(st.storage_path).rstrip('/')}/{st.experiment_dir_name}/{st.trial_dir_name}"
    except Exception as exc:  # noqa: BLE001 - another Ray version
        log.warning("trial storage unknown (%s); Train checkpoints stay on this node", exc)
        return tctx.get_trial_dir()


def run_trainer(config: dict[str, Any], train: dict[str, Any], splits, workers: int, cpus: float, gpus: float,
                max_failures: int = 0) -> Path:
    """Run a TorchTrainer of ``workers`` data-parallel workers for this Tune trial.

    Returns a local directory holding rank 0's final checkpoint (with post.json). Train's run is
    named after the trial and kept beside it, so a retried or resumed trial continues from the
    run's latest checkpoint."""
    import ray
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer

    trial_dir = _trial_storage(tune.get_context())
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"train": train, "splits_ref": ray.put(splits), "threads": max(1, int(cpus)), "use_gpu": gpus > 0,
                           "post": config.get("post"), "post_options": config.get("post_options", {})},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name="train", storage_path=trial_dir,
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = Path(tempfile.mkdtemp(prefix="raydefense-trial-"))
    result.checkpoint.to_directory(str(out))
    return out


def _local_worker(rank: int, world_size: int, port: int, train: dict[str, Any], out_dir: str, splits) -> None:
    import torch.distributed as dist

    from raydefense.config import TrainConfig
    from raydefense.train import fit

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        result = fit(TrainConfig.from_dict(train), Path(out_dir) / f"rank{rank}", splits=splits,
                     data_parallel=DataParallel())
        if rank == 0:
            (Path(out_dir) / "history.json").write_text(json.dumps(result.history))
    finally:
        dist.destroy_process_group()


def fit_local_workers(train: dict[str, Any], out_dir: str | Path, workers: int, splits=None) -> list[dict]:
    """``fit`` as ``workers`` gloo processes on this machine, without Ray (checks and debugging);
    returns rank 0's per-epoch history."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_local_worker, args=(workers, port, train, str(out_dir), splits), nprocs=workers, join=True)
    return json.loads((Path(out_dir) / "history.json").read_text())
