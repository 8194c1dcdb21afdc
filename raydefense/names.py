"""Names the library and the CLI share, in a module that imports nothing heavy.

The CLI shows these as option defaults, so it needs them when it registers its commands; keeping
them here (not beside the code that uses them, which imports torch) lets `raydefense --help` and
usage errors answer without loading torch or Ray.
"""

from __future__ import annotations

DEFAULT_ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "aa")  # raydefense evaluate
EVAL_COLUMNS = ("attack", "norm", "eps", "eps_label", "accuracy", "n", "seconds")  # eval.parquet / its table
DEFAULT_CURVE_ATTACKS = ("pgd", "pgd-l2", "fgsm", "mim")  # raydefense curves
DEFAULT_REJECT_ATTACKS = ("clean", "pgd20", "pgd20-l2", "deepfool", "adaptive-linf", "adaptive-l2")  # raydefense reject
