"""What produced a result: versions and git revision, recorded in every config.json and report."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, str | None]:
    import torch

    from raydefense import __version__

    versions = {"raydefense": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
                "platform": platform.platform(), "git": git_revision()}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return versions
