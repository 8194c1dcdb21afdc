"""Errors a user can cause. The CLI turns these into one clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (arguments, files, addresses): shown as one line, exit code 2."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete, corrupt or unsafe to load."""
