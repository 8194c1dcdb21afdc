"""Read a user's YAML file (cluster config, search space) with one-line errors that say where."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raydefense.errors import UserError


def read_yaml(path: str | Path, what: str) -> Any:
    """Parsed content of ``path``; ``what`` names the file in errors ("cluster config", "search space")."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a YAML file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file") from None
