"""Line several evaluated models up: one table (attack accuracies side by side) and one
accuracy-vs-eps plot, from the ``eval.parquet`` / ``eps_sweep.parquet`` that ``evaluate`` wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from raydefense.errors import UserError
from raydefense.report import read_parquet, write_parquet


def _label(d: Path, taken: set[str]) -> str:
    label = d.name if d.name not in taken else str(d)
    taken.add(label)
    return label


def compare(dirs: Sequence[str | Path], out: str | Path, attack: str | None = None) -> tuple[list[dict], list[str], Path | None]:
    """Rows (model, flags, one column per attack), the column names, and the plot path (None without sweeps)."""
    from raydefense.evaluate.sweeps import plot_eps

    if not dirs:
        raise UserError("compare needs at least one evaluated directory")
    rows, attacks, curves, taken = [], [], [], set()
    for d in map(Path, dirs):
        table = d / "eval.parquet"
        if not table.exists():
            raise UserError(f"{d} has no eval.parquet: run `raydefense evaluate {d}` first")
        meta = pq.read_schema(table).metadata or {}
        flags = json.loads(meta.get(b"flags", b"[]"))
        label = _label(d, taken)
        row = {"model": label, "reliable": "no" if flags else "yes", "flags": len(flags)}
        for r in read_parquet(table):
            row[r["attack"]] = r["accuracy"]
            if r["attack"] not in attacks:
                attacks.append(r["attack"])
        rows.append(row)
        sweep = d / "eps_sweep.parquet"
        if sweep.exists():
            curves += [{**r, "model": label} for r in read_parquet(sweep)]
    out = Path(out)
    write_parquet(rows, out / "compare.parquet")
    plot = None
    if curves:
        chosen = attack or next((a for a in ("pgd20", "pgd10", "fgsm") if all(
            any(c["attack"] == a and c["model"] == r["model"] for c in curves) for r in rows)), curves[0]["attack"])
        picked = [c for c in curves if c["attack"] == chosen]
        if not picked:
            raise UserError(f"no eps sweep of attack {chosen!r} in these directories")
        write_parquet(picked, out / "compare_eps.parquet")
        plot = plot_eps(picked, out / "compare_eps.png", f"accuracy vs eps under {chosen}", by="model")
    return rows, ["model", "reliable", "flags"] + attacks, plot
