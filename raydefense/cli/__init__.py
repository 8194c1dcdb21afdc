"""The ``raydefense`` command: a thin typer layer over the library.

Errors a user can cause end here as one line on stderr and exit code 2; interrupted runs exit
130. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from raydefense.errors import Interrupted, UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train, search, stack and honestly evaluate adversarially robust models on Ray.")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details")) -> None:
    from raydefense.cli.ui import setup_logging

    setup_logging(verbose)


def _register() -> None:
    # Each module adds its commands to ``app``; importing them here keeps cli/__init__ small.
    from raydefense.cli import evaluate, train  # noqa: F401
    from raydefense.cli import stack, sweep, tune  # noqa: F401
    from raydefense.cli import curves, detect  # noqa: F401
    from raydefense.cli import cluster, compare, reject, route  # noqa: F401


# typer >= 0.20 vendors its own click (``typer._click``), whose exceptions are not the ``click``
# package's: catch both families, through typer's public names where it has them.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, typer.exceptions.TyperException)

INTERRUPTED = "interrupted: finished work is kept; run the same command again to resume"


def _usage_line(exc: Exception) -> str:
    """One line for a usage error: the message and where to read the options."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {message}{where}"


def main(argv: list[str] | None = None) -> None:
    _register()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="raydefense", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except Interrupted as exc:  # Tune caught the Ctrl-C and stopped its trials; the command says what is left
        click.echo(f"{INTERRUPTED} ({exc})", err=True)
        sys.exit(exc.exit_code)
    except (*_ABORT, KeyboardInterrupt):  # Ctrl-C outside typer's own catch, or click's Abort (nothing here prompts)
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except _USAGE as exc:
        click.echo(_usage_line(exc), err=True)
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    if code == 130:  # typer turns a Ctrl-C into a silent Exit(130), which it returns here
        click.echo(INTERRUPTED, err=True)
    if isinstance(code, int) and code:  # without standalone mode, click returns Exit's code instead of raising
        sys.exit(code)
