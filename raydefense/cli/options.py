"""Generate typer options from a config dataclass, so the CLI never duplicates its fields.

Every generated option is read as text and converted by ``config.build_dataclass``, so that
'8/255', 'none' and typos get the same clear messages whether they come from the command line,
a JSON config or a search space.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, fields
from typing import Any, Callable, Optional

import typer

from raydefense.config import HELP


def dataclass_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator: add one ``--field-name`` option per dataclass field; the command receives them
    as ``overrides`` (only the ones the user gave)."""
    names = [f for f in fields(cls) if f.name not in exclude and f.name != "options"]

    def decorate(func: Callable) -> Callable:
        own = [p for p in inspect.signature(func).parameters.values() if p.name != "overrides"]
        extra = []
        for f in names:
            default = f.default if f.default is not MISSING else None
            shown = "per dataset" if default is None else default
            flag = "--" + f.name.replace("_", "-")
            is_bool = f.type in (bool, "bool")
            spelled = (f"{flag}/--no-{flag[2:]}",) if is_bool else (flag,)
            extra.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool] if is_bool else Optional[str],
                default=typer.Option(None, *spelled, show_default=False,
                                     help=f"{HELP.get(f.name, '')} [default: {shown}]", rich_help_panel="Training")))

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            overrides = {f.name: kwargs.pop(f.name) for f in names if kwargs.get(f.name) is not None}
            for f in names:
                kwargs.pop(f.name, None)
            return func(overrides=overrides, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + extra)
        return wrapper

    return decorate
