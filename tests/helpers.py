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


def interrupt_at(cmd: list[str], point: str, hold_dir: Path, stop_timeout: float) -> tuple[int, str]:
    """Run a CLI command held at ``point`` (raydefense/hold.py), Ctrl-C it there, then let it go; return
    its exit code and output (stdout and stderr together).

    The run cannot get past the point until the test lets it go, and the test does so only once the
    SIGINT has been delivered, so the interrupt lands there on any machine, however fast or loaded."""
    hold_dir.mkdir(parents=True, exist_ok=True)
    log = hold_dir / "output.log"  # a file, not a pipe: a pipe nobody reads while we wait can fill and block the run
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, env=hold_env(point, hold_dir),
                                preexec_fn=_ctrl_c_as_in_a_terminal)
    try:
        wait_for(lambda: (hold_dir / f"{point}.held").exists() or proc.poll() is not None, 600,
                 f"the run to reach {point!r}", poll=0.1)
        assert proc.poll() is None, f"the run ended before reaching {point!r}:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: not _sigint_pending(proc.pid), 60, "the SIGINT to be delivered", poll=0.02)
        (hold_dir / f"{point}.go").touch()
        proc.wait(timeout=stop_timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def hold_env(point: str, hold_dir: Path) -> dict[str, str]:
    """The environment of a CLI subprocess that stops at ``point`` until the test lets it go."""
    from raydefense.hold import DIR_ENV, POINT_ENV

    return {**unbuffered_env(), POINT_ENV: point, DIR_ENV: str(hold_dir)}


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before it starts: SIGINT back to its default. A test run started in the background
    (``pytest ... &`` from a script) ignores SIGINT, and Python then leaves it ignored in the CLI."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sigint_pending(pid: int) -> bool:
    """Whether a SIGINT sent to ``pid`` still waits to be delivered (Linux: /proc/PID/status). Once it is
    delivered, Python has noted it and runs its handler before the main thread does anything else."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # the process has ended
        return False
    bit = 1 << (signal.SIGINT - 1)
    return any(int(line.split()[1], 16) & bit for line in status.splitlines() if line.startswith(("SigPnd", "ShdPnd")))


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
