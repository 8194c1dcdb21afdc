"""Batch-sharded attacks on a multi-core CPU: one worker thread per shard, one intra-op thread each.

An attack's samples are independent (model in eval mode, per-sample summed loss), so a batch can be
split into N shards attacked at the same time on N threads. For the small models this project
trains on CPU, that is what puts a second core to work: PyTorch's intra-op threading splits each
tiny convolution over the cores and mostly waits on synchronization (measured on the 2-core CPU:
2 intra-op threads ran the small CNN's PGD steps 0.98-1.19x as fast as 1 thread; 2 shards ran
1.25-1.76x; docs/performance.md). PyTorch releases the GIL inside its kernels and autograd may run
in several threads at once, so plain Python threads suffice.

Within ``cpu_attack_shards(n)``, ``sharded`` runs an attack on n shards (shard 0 in the calling
thread), with torch's intra-op threads set to 1 for the duration and the caller's autocast state
carried into the workers (autocast is thread-local). Sharding changes how an attack runs, not what
it computes: callers draw random starts for the whole batch before sharding, so the shard count
does not change which random numbers a sample gets (tests check the results match unsharded runs).
CUDA tensors are never sharded (one GPU stream is better fed by one large batch). The setting is
process-wide (like torch's thread count): set it from the thread that runs the training or
evaluation loop.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

MIN_SHARD = 8  # below this many samples per shard the threads' overhead outweighs the parallelism
SMALL_MODEL_PARAMS = 1_000_000  # auto shards only models below this size: the regime measured to gain

_local = threading.local()  # .inside: this thread is running a shard (nested attacks run inline)
_config = {"shards": 1}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


@contextmanager
def cpu_attack_shards(n: int) -> Iterator[None]:
    """Within this block, CPU attacks split their batch over ``n`` threads (n <= 1: no sharding)."""
    previous = _config["shards"]
    _config["shards"] = max(1, int(n))
    try:
        yield
    finally:
        _config["shards"] = previous


@contextmanager
def cpu_threads_as_shards(n: int) -> Iterator[None]:
    """Spend ``n`` CPU threads on attack shards, and run every other op single-threaded meanwhile.

    For loops that alternate attacks with other work (a training step's weight update): OpenMP's
    intra-op threads keep spinning for a while after each parallel op, on the very cores the next
    attack's shards need. Measured in ``fit`` on 2 cores, leaving 2 intra-op threads for the update
    cost most of the shards' gain. The previous thread count is restored afterwards.
    """
    if n <= 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cpu_attack_shards(n):
            yield
    finally:
        torch.set_num_threads(previous)


def auto_shards(requested: int, threads: int, device: torch.device, n_params: int) -> int:
    """How many attack shards a training loop should use: ``requested`` if set (> 0), else automatic.

    Automatic: on a CPU, one shard per thread for small models (under ``SMALL_MODEL_PARAMS``), whose
    tiny convolutions intra-op threading cannot split usefully; otherwise no sharding. With shards
    every non-attack op runs single-threaded (``cpu_threads_as_shards``), which for a large model
    would leave the weight update on one core: that regime is not measured, so it keeps torch's
    intra-op threads.
    """
    if device.type != "cpu":
        return 1
    if requested > 0:
        return requested
    return threads if n_params < SMALL_MODEL_PARAMS else 1


def attack_shards() -> int:
    """How many shards an attack started now in this thread would use (before the batch-size cap)."""
    return 1 if getattr(_local, "inside", False) else _config["shards"]


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raydefense-shard")
            _pool_size = workers
        return _pool


def _run_shard(fn: Callable[..., torch.Tensor], parts: list[torch.Tensor],
               autocast_dtype: torch.dtype | None) -> torch.Tensor:
    _local.inside = True
    try:
        if autocast_dtype is None:
            return fn(*parts)
        with torch.autocast("cpu", dtype=autocast_dtype):
            return fn(*parts)
    finally:
        _local.inside = False


def sharded(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor]) -> torch.Tensor:
    """``fn(*shard_tensors) -> tensor`` over the batch (dim 0), concatenated in order.

    ``tensors`` are the attack's per-sample inputs (images, labels, random starts, reference
    outputs...), all of the same length; ``fn`` must treat samples independently (eval mode, a
    per-sample summed loss). Without sharding this is exactly ``fn(*tensors)``.
    """
    n = min(attack_shards(), len(tensors[0]) // MIN_SHARD)
    if n <= 1 or tensors[0].device.type != "cpu":
        return fn(*tensors)
    parts = [t.tensor_split(n) for t in tensors]
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = _executor(n - 1)
        futures = [pool.submit(_run_shard, fn, [p[i] for p in parts], amp) for i in range(1, n)]
        try:
            outputs = [_run_shard(fn, [p[0] for p in parts], amp)]
        finally:
            wait(futures)  # no worker may still run once the thread count is restored
        outputs += [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)
    return torch.cat(outputs)
