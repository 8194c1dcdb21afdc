"""Terminal output for the CLI (the only layer that prints): console, progress bars, logging."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


def make_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=False)


class RichFitProgress:
    """A ``train.ProgressSink`` drawing one rich bar over all batches of a fit."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None

    def start(self, total_batches: int, description: str) -> None:
        self.task = self.progress.add_task(description, total=total_batches, status="")

    def advance(self, batches: int, metrics: dict | None = None) -> None:
        status = " ".join(f"{k}={v:.3f}" for k, v in (metrics or {}).items() if "loss" in k)[:60]
        self.progress.update(self.task, advance=batches, status=status)
