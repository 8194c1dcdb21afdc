"""Errors a user can cause. The CLI turns these into one clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (arguments, files, addresses): shown as one line, exit code 2."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete, corrupt or unsafe to load."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C) whose finished work is kept; the message says what is unfinished.
    The CLI prints its interrupted line with it and exits 130, as for a plain KeyboardInterrupt."""

    exit_code = 130
