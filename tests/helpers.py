"""Helpers shared by test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def run_cli(*args) -> int:
    """Run the ``raydefense`` CLI in-process; return its exit code (0 when it returns normally)."""
    from raydefense.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def unbuffered_env() -> dict[str, str]:
    """The environment for a CLI subprocess whose output is read as it runs."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def interrupt_after_first_checkpoint(cmd: list[str], out: Path, stop_timeout: float) -> tuple[int, str]:
    """Start a CLI run, Ctrl-C it once Tune has committed a trial's first checkpoint under ``out/tune``;
    return its exit code and output. The deadline is generous: it returns as soon as that holds.

    A checkpoint folder on disk is not yet a committed checkpoint: the trial writes it before the driver
    registers it, and a Ctrl-C in between resumes the trial from scratch. Tune holds a trial's next
    training step until its checkpoint is registered, so a second result line proves the first one is."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=unbuffered_env())
    try:
        wait_for(lambda: any(len(lines) >= 2 for lines in read_results(out / "tune").values()),
                 600, "a first committed checkpoint")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=stop_timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output


def read_results(tune_dir: Path) -> dict[str, list[dict]]:
    """Each trial's complete result lines so far (trial folder name -> results), read while Tune writes."""
    out = {}
    for path in tune_dir.glob("*/result.json"):
        lines = []
        try:
            text = path.read_text()
        except FileNotFoundError:  # the trial folder is being created
            continue
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
        out[path.parent.name] = lines
    return out


def write_cifar10_batches(root: Path, per_batch: int, n_test: int, seed: int = 0) -> Path:
    """torchvision's CIFAR-10 python format under ``root/cifar-10-batches-py``: data_batch_1..5, test_batch,
    batches.meta (pickled dicts of uint8 rows of 3072 pixels and label lists); returns ``root``."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return Path(root)


def trust_fabricated_cifar(monkeypatch) -> None:
    """Fabricated files cannot match torchvision's published md5 sums; only that check is skipped."""
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the meta file's md5
