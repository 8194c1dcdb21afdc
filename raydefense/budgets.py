"""The budget grammar of ``raydefense sweep afs --budgets``.

A budget k means k * eps_unit (eps_unit = the dataset's standard eps / 8, or ``--eps-unit``), so
on CIFAR budgets 0..9 are 0/255..9/255 exactly as in the AFS paper. Accepted forms, combinable
with commas: ``0..9`` (inclusive range), ``0..9:2`` (range with a step), ``0,2,4`` (a list) and
non-integers (``0.5,1.5`` or ``0..2:0.5``).
"""

from __future__ import annotations

import math
import re

from raydefense.errors import UserError

MAX_BUDGETS = 1000
_NUMBER = r"\d+(?:\.\d+)?"
_RANGE = re.compile(rf"^({_NUMBER})\.\.({_NUMBER})(?::({_NUMBER}))?$")
_SINGLE = re.compile(rf"^{_NUMBER}$")


def _clean(value: float) -> float | int:
    rounded = round(value, 9)
    return int(rounded) if float(rounded).is_integer() else rounded


def parse_budgets(text: str) -> list[float | int]:
    """'0..9' -> [0, 1, ..., 9]; sorted, without duplicates; one clear error for anything else."""
    spec = (text or "").replace(" ", "")
    if not spec:
        raise UserError("--budgets is empty; write e.g. 0..9, 3..8, 0,2,4 or 0..9:2")
    budgets: list[float] = []
    for part in spec.split(","):
        if m := _RANGE.match(part):
            lo, hi, step = float(m[1]), float(m[2]), float(m[3]) if m[3] else 1.0
            if hi < lo:
                raise UserError(f"budget range {part!r} runs backwards; write {m[2]}..{m[1]}")
            if step <= 0:
                raise UserError(f"budget range {part!r} needs a step > 0")
            count = math.floor((hi - lo) / step + 1e-9) + 1
            if count > MAX_BUDGETS:
                raise UserError(f"budget range {part!r} gives {count} budgets; at most {MAX_BUDGETS}")
            budgets += [lo + i * step for i in range(count)]
        elif _SINGLE.match(part):
            budgets.append(float(part))
        else:
            raise UserError(f"cannot read budget {part!r} in {text!r}; write e.g. 0..9, 3..8, 0,2,4 or 0..9:2 "
                            "(budgets are >= 0)")
    return [_clean(b) for b in sorted(set(round(b, 9) for b in budgets))]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0..2' -> [0, 1, 2]."""
    values = parse_budgets(text) if text else [0]
    if any(not isinstance(v, int) for v in values):
        raise UserError(f"seeds must be whole numbers, got {text!r}")
    return [int(v) for v in values]
