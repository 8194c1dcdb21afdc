"""Ray Tune callback that forwards trial events to the live display (raydefense.cli.ui).

Tune pickles callbacks with the experiment state, so the callback holds no display itself: it
forwards events to the display of the current process. Kept apart from ui.py because importing
Ray Tune takes about 2 s, which commands without a Tune experiment should not pay.
"""

from __future__ import annotations

from ray.tune import Callback

from raydefense.cli import ui


class TuneProgressCallback(Callback):
    def on_trial_result(self, iteration, trials, trial, result, **info):
        display = ui.active_display()
        if display is not None:
            display.result(trial.trial_id, trial.config, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        display = ui.active_display()
        if display is not None:
            display.finish(trial.trial_id, trial.config, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        display = ui.active_display()
        if display is not None:
            display.finish(trial.trial_id, trial.config, "[red]error")
