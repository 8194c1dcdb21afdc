"""Registry of defenses: name -> "module:Class", imported lazily so one broken method cannot
break the others and the CLI starts fast. Adding a defense = one file + one line here."""

from __future__ import annotations

import importlib

from raydefense.errors import UserError
from raydefense.methods.base import Method, MethodContext

REGISTRY: dict[str, str] = {
    "natural": "raydefense.methods.baselines:Natural",
    "pgd-at": "raydefense.methods.baselines:PGDAT",
    "trades": "raydefense.methods.baselines:TRADES",
    "mart": "raydefense.methods.baselines:MART",
    "afd-dcgan": "raydefense.methods.afd:AFD",
    "afd-wgan": "raydefense.methods.afd:AFDWgan",
    "er": "raydefense.methods.er:ERClassifier",
    "er-": "raydefense.methods.er:ERMinus",
    "er-trades": "raydefense.methods.er:ERTrades",
    "rfd": "raydefense.methods.rfd:RFD",
    "ldat": "raydefense.methods.ldat:LDAT",
}


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(ctx: MethodContext) -> Method:
    return get_method_class(ctx.cfg.method)(ctx)


__all__ = ["Method", "MethodContext", "REGISTRY", "build_method", "get_method_class", "method_names"]
