"""Terminal output for the CLI (the only layer that prints): console, progress bars, logging."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


def make_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=False, refresh_per_second=2)  # 2 Hz: the bars move per
    # batch or per epoch, and on a 2-core machine the default 10 Hz redraw takes CPU from the trials


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


# --------------------------------------------------------------------------------------------
# Live display of a Tune experiment. Tune pickles callbacks with the experiment state, so the
# callback holds no display itself: it forwards events to the display of the current process.

_ACTIVE_DISPLAY: "TrialsDisplay | None" = None


def __getattr__(name: str):
    """``TuneProgressCallback`` lives in cli/tune_progress.py (it imports Ray Tune, which every command
    would otherwise load at start-up); experiments pickled under this module's name still resolve."""
    if name == "TuneProgressCallback":
        from raydefense.cli.tune_progress import TuneProgressCallback

        return TuneProgressCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def active_display() -> "TrialsDisplay | None":
    """The display of this process's running experiment, if any (TuneProgressCallback's target)."""
    return _ACTIVE_DISPLAY


class TrialsDisplay:
    """One bar per trial (epochs) and one for the experiment (trials finished)."""

    def __init__(self, total_trials: int, epochs: int, label):
        self.progress = make_progress()
        self.total = self.progress.add_task("trials finished", total=total_trials, status="")
        self.epochs, self.label, self.tasks = epochs, label, {}

    def __enter__(self) -> "TrialsDisplay":
        global _ACTIVE_DISPLAY
        _ACTIVE_DISPLAY = self
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE_DISPLAY
        _ACTIVE_DISPLAY = None
        self.progress.stop()

    def _task(self, trial_id: str, config: dict):
        if trial_id not in self.tasks:
            self.tasks[trial_id] = self.progress.add_task(self.label(config), total=self.epochs, status="")
        return self.tasks[trial_id]

    def result(self, trial_id: str, config: dict, result: dict) -> None:
        task = self._task(trial_id, config)
        status = " ".join(f"{k[4:]}={result[k]:.3f}" for k in ("val_clean_acc", "val_robust_acc") if k in result)
        if result.get("done_training"):
            status = f"Delta_z={result['delta_z']:.3f}" if "delta_z" in result else "evaluated"
        self.progress.update(task, completed=result.get("epochs_run", result.get("epoch", 0)), status=status)

    def finish(self, trial_id: str, config: dict, status: str) -> None:
        self.progress.update(self._task(trial_id, config), completed=self.epochs, status=status)
        self.progress.advance(self.total)


def print_ray_info(ray_info: dict, storage: str) -> None:
    """Where to watch a Ray run: dashboard (or why there is none), results, TensorBoard."""
    if ray_info.get("dashboard_url"):
        console.print(f"Ray dashboard: {ray_info['dashboard_url']}")
    elif ray_info.get("dashboard_note"):
        console.print(f"[dim]no Ray dashboard: {escape(ray_info['dashboard_note'])}[/]")
    console.print(f"[dim]results and checkpoints: {escape(storage)}; TensorBoard: tensorboard --logdir {escape(storage)}[/]")
