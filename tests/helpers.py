"""Helpers shared by test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

import time
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
