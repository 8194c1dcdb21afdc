"""Errors a user can cause. The CLI turns these into one clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (arguments, files, addresses): shown as one line, exit code 2."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete, corrupt or unsafe to load."""


class TrainingDiverged(UserError):
    """A loss or a weight became NaN/inf: the run stops, keeps nothing as finished, exit code 1.

    A UserError so that the CLI shows its one line; exit 1, not 2, because the arguments parsed
    fine and it was training that failed (the settings, e.g. a too large lr, are the usual cause)."""

    exit_code = 1


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C) whose finished work is kept; the message says what is unfinished.
    The CLI prints its interrupted line with it and exits 130, as for a plain KeyboardInterrupt."""

    exit_code = 130
