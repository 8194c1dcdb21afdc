"""``raydefense cluster check cluster.yaml``: validate a Ray cluster-launcher config offline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from raydefense.cli import app

cluster_app = typer.Typer(no_args_is_help=True, help="Ray cluster configs (ray up / ray job submit).")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("check")
def cluster_check(
    config: Path = typer.Argument(Path("cluster.yaml"), help="Ray cluster-launcher YAML (e.g. cluster.yaml)"),
) -> None:
    """Fill Ray's defaults and validate against Ray's schema, as `ray up` does; contacts no cloud."""
    from raydefense.cli.ui import console
    from raydefense.distributed.cluster_config import check_cluster_config
    from raydefense.report import rich_table

    check = check_cluster_config(config)
    rows = [{"node type": n.name, "role": n.role, "instance": n.instance, "market": n.market,
             "min": n.min_workers, "max": n.max_workers,
             "resources": ", ".join(f"{k}={v}" for k, v in n.resources.items()) or "auto"} for n in check.node_types]
    console.print(rich_table(rows, ["node type", "role", "instance", "market", "min", "max", "resources"],
                             title=f"{check.name}: {check.provider} {check.region}, max {check.max_workers} workers, "
                                   f"idle timeout {check.idle_timeout_minutes:g} min"))
    for w in check.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    console.print(f"[green]{config} is a valid Ray {check.provider} cluster config[/] (checked offline with "
                  "Ray's defaults and schema; `ray up` still needs cloud credentials)")
