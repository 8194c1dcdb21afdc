"""Tables out: Parquet for every table (pyarrow), Markdown for reports, rich tables for the terminal.

Parquet files are written to a temporary name and renamed, so a crash never leaves a table that
looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from raydefense.checkpoint import atomic_target


def write_parquet(rows: Sequence[dict[str, Any]], path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows))
    if metadata:
        table = table.replace_schema_metadata({k: json.dumps(v) for k, v in metadata.items()})
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "" if value is None else str(value)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], title: str | None = None):
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c not in ("attack", "method", "checkpoint") else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    return table
