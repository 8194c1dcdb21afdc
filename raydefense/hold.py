"""A pause point for tests that must Ctrl-C a run at a known moment, whatever the machine's speed.

Inert unless the environment names it: ``RAYDEFENSE_TEST_HOLD_AT=<point>`` and
``RAYDEFENSE_TEST_HOLD_DIR=<dir>`` (only tests set them). Then the first time this process reaches
``hold(<point>)`` it creates ``<dir>/<point>.held`` and waits until ``<dir>/<point>.go`` exists: the run
can make no progress meanwhile, so the test's Ctrl-C lands exactly there. Once ``.go`` exists the
point lets everything through, so the resumed run (same environment) does not stop again.

Points: ``epoch`` (``train.fit``, after an epoch's checkpoint and metrics are written) and
``checkpoint`` (a Tune driver, after it has registered a trial's checkpoint; every trial is then
blocked at its next report, and pending trials stay pending).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

POINT_ENV, DIR_ENV = "RAYDEFENSE_TEST_HOLD_AT", "RAYDEFENSE_TEST_HOLD_DIR"
MAX_WAIT_S = 900.0  # a test that never lets go must not hang a run forever


def armed(point: str) -> bool:
    """Whether ``hold(point)`` would stop here (the environment names this point and it was not let go)."""
    root = os.environ.get(DIR_ENV)
    return bool(root) and os.environ.get(POINT_ENV) == point and not (Path(root) / f"{point}.go").exists()


def hold(point: str) -> None:
    """Wait at ``point`` until the test lets go (see the module docstring); return at once otherwise."""
    if not armed(point):
        return
    root = Path(os.environ[DIR_ENV])
    go = root / f"{point}.go"
    (root / f"{point}.held").touch()
    log.info("test hold: waiting at %r until %s exists", point, go)
    deadline = time.monotonic() + MAX_WAIT_S
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
